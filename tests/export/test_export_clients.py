"""The export as its clients use it, each in a fresh interpreter (``python -I``, from a
temporary directory) where the project cannot be imported: the base class and plain loaders
(dense), PEFT LoRA, gradients, torch.compile/torch.export, the tokenizer. The checks live in
tests/export_clients.py; these tests assert on the numbers they print."""

import json
import os
import subprocess
import sys

import pytest
from test_export import _export_tiny
from transformers import AutoTokenizer

from conftest import REPO

CLIENTS = REPO / "tests" / "export_clients.py"
ROUTER_SUFFIX = ".router.weight"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny exports (thresholds that skip experts) of a SwiGLU Llama, GPT-2 (Conv1D, biases) and Qwen2."""
    root = tmp_path_factory.mktemp("exports")
    # loaded as the pipeline loads it: these arguments end up in tokenizer_config.json unless removed
    tokenizer = AutoTokenizer.from_pretrained(
        REPO / "assets" / "stories260K", local_files_only=True, trust_remote_code=False
    )
    assert {"is_local", "local_files_only"} <= set(tokenizer.init_kwargs)
    for family in ("llama", "gpt2", "qwen2"):
        _export_tiny(family, root / family, tokenizer)
    return root


def run_client(check, *directories, cwd):
    proc = subprocess.run(
        [sys.executable, "-I", str(CLIENTS), check, *map(str, directories)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[y/N]" not in proc.stdout + proc.stderr  # nothing asked to confirm remote code
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result.pop("project_importable") is False  # `import lte` fails in the client
    return result


def test_plain_loaders_get_the_dense_base_model_and_tokenizer(exports, tmp_path):
    families = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}
    results = run_client("base_class", *(exports / f for f in families), cwd=tmp_path)
    for family, cls in families.items():
        r = results[str(exports / family)]
        assert r["base_class"] == r["auto_class"] == cls and r["sparse_class"] == "LTEForCausalLM", (family, r)
        assert r["model_type"] == family
        # every tensor of the weight files loads under its standard name and shape, and nothing else is there:
        # the routers are in lte/routers.safetensors (format 2), one per layer
        assert r["missing"] == [] and r["mismatched"] == [] and r["unexpected"] == [], (family, r)
        assert not any(k.endswith(ROUTER_SUFFIX) for k in r["weight_names"]), (family, r)
        assert len(r["router_names"]) == 2 and all(k.endswith(ROUTER_SUFFIX) for k in r["router_names"]), (family, r)
        # the base class computes the export's lte_routing="dense" logits (and the original model's)
        assert r["base_vs_dense"] < 1e-6 and r["auto_vs_dense"] < 1e-6 and r["base_vs_original"] < 1e-5, (family, r)
        assert r["sparse_vs_trained"] < 1e-6 and r["sparse_vs_base"] > 1e-3, (family, r)  # remote code: sparse
        assert r["use_cache"] is True and r["base_use_cache"] is True
        # save_pretrained of the sparse model writes the same kind of checkpoint
        assert r["resaved_architectures"] == [cls] and r["resaved_model_type"] == family and r["resaved_format"] == 2
        assert r["resaved_weight_names"] == r["weight_names"] and r["resaved_router_names"] == r["router_names"]
        assert r["resaved_vs_base"] < 1e-6 and r["resaved_sparse"] < 1e-6, (family, r)
        loader_leftovers = {"is_local", "local_files_only", "trust_remote_code", "_commit_hash", "cache_dir"}
        assert not loader_leftovers & set(r["tokenizer_keys"]), r["tokenizer_keys"]
        assert len(r["tokens"]) >= 3


def test_peft_all_linear_adapts_the_ffn_and_the_merged_model_stays_sparse(exports, tmp_path):
    ffn = {"llama": {"gate_proj", "up_proj", "down_proj"}, "gpt2": {"c_fc", "c_proj"}}
    results = run_client("peft_lora", *(exports / f for f in ffn), cwd=tmp_path)
    for family, projections in ffn.items():
        r = results[str(exports / family)]
        assert projections <= set(r["adapted"]) and "router" not in r["adapted"], (family, r["adapted"])
        for name in projections:  # 3 steps x 2 layers: the FFN adapters learn
            assert max(r["grad_norms"][name]) > 1e-4, (family, name, r["grad_norms"])
        assert r["routers_unchanged"]
        assert r["routed_count"] == 2 * (len(projections) if family == "gpt2" else 3)
        assert all(name.startswith(("RoutedFirst", "RoutedDown")) for name in r["routed"])
        # the adapter trained what is deployed: unmerged (adapters see the routed neurons) = merged
        assert r["merged_vs_unmerged"] < 1e-5, (family, r)
        assert r["merged_vs_dense"] > 1e-3 and max(r["sparsity"]) > 0, (family, r)  # still sparse after merging
        assert r["token_vs_masked"] < 1e-5, (family, r)  # the kernel path on the merged weights
        assert r["trained_vs_original"] > 1e-3  # training changed the model


def test_gradients_through_the_export_match_the_masked_path(exports, tmp_path):
    results = run_client("gradients", exports / "llama", exports / "gpt2", cwd=tmp_path)
    for family in ("llama", "gpt2"):
        r = results[str(exports / family)]
        assert r["cpu_kernel"]  # so 1 to 8 tokens would take the kernel path without autograd
        for tokens in ("1", "2", "8", "9"):
            row = r["rows"][tokens]
            assert row["none_mismatch"] == [] and row["worst"] < 1e-5, (family, tokens, row)
            assert row["ffn_params"] >= 4 and row["ffn_grad_norm"] > 1e-4, (family, tokens, row)
            assert row["no_grad_vs_grad"] < 1e-5, (family, tokens, row)  # the kernels compute the same logits
        # frozen weights: autograd is on but nothing needs a gradient, so the kernels run
        assert r["frozen_grad_enabled"] and not r["frozen_requires_grad"] and r["frozen_kernel_calls"] == 2, r


def test_a_decode_step_compiles_into_one_graph_and_exports(exports, tmp_path):
    results = run_client("compiled", exports / "llama", exports / "gpt2", cwd=tmp_path)
    for family in ("llama", "gpt2"):
        r = results[str(exports / family)]
        assert r["graph_breaks"] == 0 and r["graphs"] == 1, (family, r)
        assert {op.split(".")[0] for op in r["ops"]} == {"slot_matvec", "slot_matvec_t"}, (
            r
        )  # the kernel is in the graph
        assert r["compiled_vs_eager"] < 1e-6, (family, r)
        assert len(r["export_ops"]) == 2 and r["export_error"] < 1e-6, (family, r)
