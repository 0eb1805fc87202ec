"""``lte bench serve --make-model``: the benchmark's exports (one per sparsity, same weights), built once.

The vLLM runs themselves are benchmarks (bench/results/serve_vllm_*.json), not tests; the CLI's bad-input
cases are in tests/test_bad_input.py.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lte.core.errors import UsageError
from lte.tools.bench_serve import MODEL_MARKER, is_ours, make_serve_model, parse_cores

# TinyLlama's layout at a tiny size (head size 32, grouped KV heads), so the test builds in seconds.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=1000,
    max_position_embeddings=256,
)


def weights(path):
    return {name: tensor for file in sorted(path.rglob("*.safetensors")) for name, tensor in load_file(file).items()}


def test_make_model_writes_one_bf16_export_per_sparsity_with_the_same_weights(tmp_path):
    s50, s90 = make_serve_model(tmp_path, [0.5, 0.9], progress=False, shape=SHAPE)
    configs = [json.loads((p / "config.json").read_text()) for p in (s50, s90)]
    for config in configs:
        assert config["architectures"] == ["LlamaForCausalLM"] and config["lte_routing"] == "hard"
        assert config["dtype"] == "bfloat16" and config["intermediate_size"] == 256
        assert len(config["lte_thresholds"]) == 2
    assert all(t90 > t50 for t50, t90 in zip(configs[0]["lte_thresholds"], configs[1]["lte_thresholds"], strict=True))
    first, second = weights(s50), weights(s90)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(t.dtype == torch.bfloat16 for t in first.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(s90, trust_remote_code=True, dtype=torch.bfloat16)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_make_model_reuses_what_it_built_and_refuses_other_folders(tmp_path):
    (s50,) = make_serve_model(tmp_path, [0.5], progress=False, shape=SHAPE)
    stamp = {p: p.stat().st_mtime_ns for p in s50.rglob("*")}
    assert make_serve_model(tmp_path, [0.5], progress=False, shape=SHAPE) == [s50]
    assert {p: p.stat().st_mtime_ns for p in s50.rglob("*")} == stamp, "a rerun rewrote the model"
    (s50 / MODEL_MARKER).write_text(json.dumps({"someone": "else"}))  # not ours any more
    with pytest.raises(UsageError, match="exists and is not a model this command built"):
        make_serve_model(tmp_path, [0.5], progress=False, shape=SHAPE)
    assert (s50 / "config.json").is_file(), "the folder was left as it was"


def test_cores_and_plugin_selection():
    assert parse_cores("0") == [0]
    with pytest.raises(UsageError, match="--cores"):
        parse_cores("0-x")
    assert is_ours("lte.serve.vllm_plugin:register") and not is_ours("vllm.plugins.lora_resolvers.x:register")
    assert not is_ours("lte_other.plugin:register")
