"""`train.py recipe=qwen2_moe` on a tiny random Qwen2-MoE (routed experts plus a shared expert; the recipe's own
settings, a few steps per stage: tests/training/test_recipes.py's CPU overrides) and its export (format 2),
then loaded by a client that cannot import the project: dense through the base class, sparse with remote code."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO
from lte.export.thresholds import set_thresholds
from lte.model.inject import load_lte
from lte.model.layers import _collector
from lte.tools.bench import run_counting_skips
from lte.training.evaluate import evaluate_batches
from moe_configs import BF16_VALIDATION_ERROR

sys.path.insert(0, str(REPO / "tests" / "model"))
sys.path.insert(0, str(REPO / "tests" / "export"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "training"))
from test_export_clients import run_client
from test_recipes import cpu_overrides
from tiny_moe import write

RECIPES = ["qwen2_moe"]  # the MoE recipes; the other families' experts: tests/model/test_moe.py


@pytest.fixture(scope="module", params=RECIPES)
def moe_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    overrides = cpu_overrides(request.param, root)  # writes the tiny model to root / "model"
    proc = subprocess.run(
        [sys.executable, "train.py", f"recipe={request.param}", *overrides, "train.report_to=[]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, root / "model", root / "run"


@pytest.mark.slow
def test_both_stages_train_and_the_export_lands_at_its_target(moe_run):
    _, _, out = moe_run
    report = json.loads((out / "report.json").read_text())
    hosts = json.loads((out / "stage2" / "model" / "lte_config.json").read_text())["ffn_hosts"]
    routed = [h for h in hosts if h["path"].endswith("mlp.experts")]
    assert len(routed) == 2 and len(hosts) == 4  # + the shared experts
    assert len(report["per_layer_sparsity"]) == len(hosts)
    assert 0.3 < report["sparsity"] < 0.7  # two steps per stage from centroid routers at threshold 0.5: loosely
    export = report["export"]
    # held-out sparsity, counted over the neurons of the experts each token ran, within 2 points of 50%
    assert abs(export["heldout_sparsity"] - 0.5) < 0.02, export
    assert export["sparse_ppl"] < 1.5 * export["dense_ppl"]
    kinds = ["routed experts" if h["path"].endswith("mlp.experts") else "dense FFNs" for h in hosts]
    for kind, value in export["sparsity_by_kind"].items():  # routed and shared experts apart
        mine = [s for k, s in zip(kinds, export["per_layer_sparsity"], strict=True) if k == kind]
        assert value == pytest.approx(sum(mine) / len(mine))
    assert set(export["sparsity_by_kind"]) == set(kinds) == {"routed experts", "dense FFNs"}
    # FFN bytes one token reads, bf16, 2 layers: top-k experts x (gate, up, down) x width x hidden; shared alike
    config = json.loads((out / "export" / "config.json").read_text())
    hidden, width = config["hidden_size"], config["moe_intermediate_size"]
    shared = config["shared_expert_intermediate_size"]
    full = {
        "routed experts": 2 * config["num_experts_per_tok"] * 3 * width * hidden * 2,
        "dense FFNs": 2 * 3 * shared * hidden * 2,
    }
    for kind, read in export["ffn_bytes_per_token"].items():
        assert read["all_groups"] == full[kind], (kind, read)
        assert read["sparse"] == pytest.approx(full[kind] * (1 - export["sparsity_by_kind"][kind]), rel=1e-6)


@pytest.mark.slow
def test_the_export_keeps_base_names_and_loads_dense_and_sparse_without_the_project(moe_run, tmp_path):
    _, model_dir, out = moe_run
    export = tmp_path / "export"
    shutil.copytree(out / "export", export)
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())  # the base checkpoint's own per-expert names, nothing else
    with safe_open(str(export / "lte" / "routers.safetensors"), "pt") as f:
        keys = f.keys()
        routers = {k: f.get_tensor(k).shape for k in keys}
    assert routers["model.layers.0.mlp.experts.lte_router.weight"] == (4, 4, 32)  # [experts, groups, hidden]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    sparse = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    for layer in sparse.model.layers:  # from_pretrained put each expert's down rows neuron-major: the kernel reads them
        down = layer.mlp.experts.down_proj  # [E, H, I] as transformers keeps it
        assert down.transpose(1, 2).is_contiguous() and not down.is_contiguous()
    # the export counts what each layer skips, its routed experts over the (token, selected expert) pairs, as
    # the trained model's evaluation counts it on the same tokens (the report's held-out sparsity)
    assert all(layer.mlp.experts.lte_kernels(layer.mlp.experts.gate_up_proj) for layer in sparse.model.layers)
    trained_model = load_lte(out / "stage2" / "model")
    set_thresholds(trained_model, sparse.config.lte_thresholds)
    for tokens in (ids, ids[:1, :1]):  # many tokens per expert (masked), one token (decode: the kernel path)
        expected_skips = evaluate_batches(trained_model, [{"input_ids": tokens, "labels": tokens}]).per_layer_sparsity
        with torch.no_grad():
            run_counting_skips(sparse, lambda tokens=tokens: sparse(tokens))
        skips = sparse.lte_sparsity()  # None: a layer that counted nothing
        assert len(skips) == 4 and None not in skips and max(skips) > (0.5 if tokens is ids else 0), skips
        assert skips == pytest.approx(expected_skips, abs=1e-6)
    with torch.no_grad():
        trained = sparse(ids).logits
        sparse.config.lte_routing = "dense"  # the trained model with every group of the selected experts
        expected = {"ids": ids, "dense": sparse(ids).logits, "sparse": trained}
    torch.save(expected, export / "expected.pt")
    r = run_client("base_class", export, cwd=tmp_path)[str(export)]
    assert r["sparse_class"] == "LTEForCausalLM" and r["base_class"] == r["auto_class"]
    assert r["missing"] == [] and r["unexpected"] == [] and r["mismatched"] == [], r
    assert r["base_vs_dense"] < 1e-5 and r["base_vs_original"] < 1e-5, r  # the base class: the trained model, dense
    assert r["sparse_vs_trained"] < 1e-5 and r["sparse_vs_base"] > 1e-3, r  # remote code: routed, sparse
    assert r["resaved_weight_names"] == r["weight_names"] and r["resaved_router_names"] == r["router_names"]
    assert r["resaved_sparse"] < 1e-5, r
    # generate (KV cache, the routed experts' decode path) in the client gives the tokens of greedy full forwards
    # of the trained model here: routed for the remote code, every group for the base class
    g = run_client("generate", export, cwd=tmp_path)[str(export)]
    prompt = transformers.AutoTokenizer.from_pretrained(export)("Once upon a time", return_tensors="pt").input_ids
    for routing in ("hard", "dense"):
        sparse.config.lte_routing = routing
        ids = prompt
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, sparse(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert g["sparse" if routing == "hard" else "dense"] == ids[0, prompt.shape[1] :].tolist(), routing


# qwen2_moe: a shared expert of 16 neurons, 4 groups of 4, as many as the routed experts: its LTE router has the
# shape of an MoE router ([E, H]) and must not be taken for one.
@pytest.mark.parametrize(("family", "sizes"), [("mixtral", {}), ("qwen2_moe", {"shared_expert_intermediate_size": 16})])
def test_the_moe_router_stays_frozen_unless_the_recipe_trains_it(family, sizes, tmp_path):
    from lte.model.experts import moe_router_parameters
    from lte.model.inject import LTEModelConfig, inject_lte, save_lte
    from lte.model.layers import ROUTER_PREFIX
    from lte.pipeline import build_stage_model
    from lte.training.config import load_recipe

    model_dir = write(family, tmp_path / "model", **sizes)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    save_lte(model, tmp_path / "prepared")
    for train_it in (False, True):
        recipe = load_recipe(
            ["recipe=tiny", f"model.name_or_path={model_dir}", f"lte.train_moe_router={train_it}"],
            check_hardware=False,
        )
        stage = build_stage_model("stage1", recipe, tmp_path / "prepared", recipe.stage_args("stage1", use_cpu=True))
        routers = moe_router_parameters(stage)
        assert [name.rsplit(".", 3)[-3:] for name, _ in routers] == [["mlp", "gate", "weight"]] * 2, routers
        assert {p.requires_grad for _, p in routers} == {train_it}
        lte_routers = [p for name, p in stage.named_parameters() if ROUTER_PREFIX in name]
        assert lte_routers and all(p.requires_grad for p in lte_routers)  # stage 1 trains every LTE router


@pytest.mark.slow
def test_the_moe_recipe_trains_lora_on_the_experts_and_merges_it(tmp_path):
    """`recipe=qwen2_moe lora.r=4`: each stage's adapter holds LoRA factors of every routed experts module (PEFT
    target_parameters) beside the attention's and the shared expert's; the merged stage models are plain
    checkpoints whose expert weights moved; the export lands at its target."""
    # two steps per stage at the recipe's learning rate (1e-5) would not move bf16 weights
    overrides = [*cpu_overrides("qwen2_moe", tmp_path), "train.report_to=[]", "lora.r=4", "train.learning_rate=1e-3"]
    proc = subprocess.run(
        [sys.executable, "train.py", "recipe=qwen2_moe", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("and the experts' weights of 2 MoE layers") == 2, proc.stderr[-3000:]
    out = tmp_path / "run"
    for stage in ("stage1", "stage2"):
        adapter = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        for layer in (0, 1):
            experts = [k for k in adapter if f"layers.{layer}.mlp.experts.base_layer" in k and "lora_A" in k]
            assert len(experts) == 2, sorted(adapter)  # one factor pair per tensor: gate_up_proj and down_proj
        assert any("shared_expert.base_layer.down_proj.lora_A" in k for k in adapter)
        assert not any(".mlp.gate." in k for k in adapter)  # the model's own router: frozen, never adapted
    prepared = load_file(str(out / "prepare" / "model" / "model.safetensors"))
    merged = load_file(str(out / "stage2" / "model" / "model.safetensors"))
    assert set(prepared) == set(merged) and not any("lora" in k for k in merged)
    experts = [k for k in merged if ".mlp.experts." in k]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    changed = [k for k in experts if not torch.equal(prepared[k], merged[k])]
    assert len(changed) == len(experts), sorted(set(experts) - set(changed))  # the experts' adapters merged in
    assert torch.equal(prepared["model.layers.0.mlp.gate.weight"], merged["model.layers.0.mlp.gate.weight"])
    export = json.loads((out / "export" / "lte_export.json").read_text())
    assert abs(export["heldout_sparsity"] - 0.5) < 0.02 and export["validation_error"] < BF16_VALIDATION_ERROR, export


@pytest.mark.slow
def test_compare_runs_lte_and_the_baselines_inside_the_routed_experts(moe_run, tmp_path):
    """`lte compare` on an MoE export: TEAL and CATS run inside the routed experts, the methods defined on dense
    FFNs are skipped with the reason, and the LTE row counts what the trained model's evaluation counts."""
    _, model_dir, out = moe_run
    data = REPO / "assets" / "tinystories" / "eval.txt"
    cmp = tmp_path / "cmp"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lte", "compare", "--model", str(model_dir), "--lte", str(out / "export")),
            *("--data", str(data), "--methods", "dense,lte,teal,cats,griffin,moefication", "--sparsity", "0.5"),
            *("--calibration-tokens", "1024", "--max-eval-tokens", "1024", "--block-size", "64", "--out", str(cmp)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((cmp / "results.json").read_text())["rows"]}
    for method in ("griffin", "moefication"):
        assert "routed experts" in rows[method]["skipped"], rows[method]
    dense = rows["dense"]
    for method in ("lte", "teal", "cats"):
        row = rows[method]
        assert len(row["per_layer_sparsity"]) == 4  # 2 routed experts modules, 2 shared experts
        assert abs(row["realized_sparsity"] - 0.5) < 0.1, (method, row["realized_sparsity"])
        # a random model: KL, not perplexity
        assert row["kl"] > 0 and row["ffn_flops_per_token"] < dense["ffn_flops_per_token"]
    # the LTE row: counted over the (token, selected expert) pairs of the scored positions, as the trained model's
    # evaluation counts them on the same tokens (with the prompt scored too: prefix 0)
    from lte.compare.harness import lte_method, score

    exported = [json.loads((out / "export" / "lte_export.json").read_text())]
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}]
    model, handle, set_target = lte_method(out, batches, "tuned", torch.device("cpu"), exported)
    set_target(0.5)
    counted = score(model, model, handle, batches, prefix=0)["per_layer_sparsity"]
    trained = load_lte(out / "stage2" / "model")
    set_thresholds(trained, exported[0]["thresholds"])
    expected = evaluate_batches(trained, batches).per_layer_sparsity
    assert counted == pytest.approx(expected, abs=1e-6) and max(counted) > 0.2
    handle.reset()
    handle.prefix = 16
    with torch.no_grad():
        model(input_ids=ids)  # counted: the (token, selected expert) pairs after a 16-token prompt
    routed = [site for site in handle.sites if site.experts is not None]
    assert len(routed) == 2 and [int(handle._count[s.index]) for s in routed] == [2 * 16 * s.top_k for s in routed]
    with pytest.raises(IndexError), torch.no_grad():  # a forward that raises (an id outside the vocabulary)
        model(input_ids=torch.full((1, 4), 10**6))
    assert _collector.get() is None  # closed the router records it had opened
    set_target(0.7)  # another target: the thresholds are tuned on the calibration batch, here the scored one
    tuned = score(model, model, handle, batches, prefix=0)["realized_sparsity"]
    assert abs(tuned - 0.7) < 0.05, tuned
