"""Structural FFN detection: the layout comes from the module tree and one traced forward."""

import json
import math
import types

import pytest
import torch
import transformers

from conftest import FAMILY_CONFIGS, REPO, tiny_model
from lte.core.errors import UsageError
from lte.model.detect import candidates, detect_layout
from lte.model.inject import LTEModelConfig, check_expert_size, inject_lte, load_lte, save_lte, set_lte_routing
from lte.model.registry import FFNSpec, layout_to_list
from lte.training.preflight import check_attn_implementation

GATED = FFNSpec(first=("gate_proj", "up_proj"), down="down_proj", cluster_on="gate_proj")
# The layouts the hand-written registry held before detection; detection must find the same.
FORMER_REGISTRY = {
    "llama": GATED,
    "mistral": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
    "gemma": GATED,
    "phi3": FFNSpec(first=("gate_up_proj",), down="down_proj", cluster_on="gate_up_proj", fused_chunks=2),
    "gpt2": FFNSpec(first=("c_fc",), down="c_proj", cluster_on="c_fc"),
    "gpt_neox": FFNSpec(first=("dense_h_to_4h",), down="dense_4h_to_h", cluster_on="dense_h_to_4h"),
    "opt": FFNSpec(first=("fc1",), down="fc2", cluster_on="fc1"),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_detection_finds_the_former_registry_layout(family):
    model = tiny_model(family)
    layout = detect_layout(model, group=8)
    assert len(layout) == 2 and set(layout.values()) == {FORMER_REGISTRY[family]}


def _up_before_gate(model):
    """FalconH1's order: up_proj runs before gate_proj."""
    for layer in model.model.layers:
        mlp = layer.mlp

        def forward(self, x):
            up = self.up_proj(x)
            return self.down_proj(self.act_fn(self.gate_proj(x)) * up)

        mlp.forward = types.MethodType(forward, mlp)
    return model


def test_first_is_in_call_order_and_the_gate_is_found_by_its_nonlinearity():
    layout = detect_layout(_up_before_gate(tiny_model("llama")), group=8)
    assert set(layout.values()) == {FFNSpec(first=("up_proj", "gate_proj"), down="down_proj", cluster_on="gate_proj")}


def test_call_order_reaches_the_export_schema(tmp_path):
    from lte.export.exporter import to_routed

    model = inject_lte(
        _up_before_gate(tiny_model("llama")), LTEModelConfig(expert_size=8, router_init="centroid"), progress=False
    )
    set_lte_routing(model, "hard")
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
    to_routed(model, [0.5, 0.5])
    hosts = model.config.lte_ffn["hosts"]
    assert [h["path"] for h in hosts] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(
        h["first"] == ["up_proj", "gate_proj"] and h["down"] == "down_proj" and h["fused_chunks"] == 1 for h in hosts
    )
    assert model.model.layers[0].mlp.up_proj.router is not None and model.model.layers[0].mlp.gate_proj.router is None
    with torch.no_grad():
        got = model(x).logits  # the routed model, in the base class's own forward
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ambiguous_gate_is_refused_with_the_candidates_and_the_recipe_key():
    model = tiny_model("llama")
    for layer in model.model.layers:
        mlp = layer.mlp

        def forward(self, x):  # both first projections go through the activation: which is the gate?
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.act_fn(self.up_proj(x)))

        mlp.forward = types.MethodType(forward, mlp)
    with pytest.raises(UsageError, match=r"model\.layers\.0\.mlp.*'gate_proj', 'up_proj'.*model\.ffn_layout"):
        detect_layout(model)
    layout = detect_layout(model, {"LlamaMLP": {"first": ["gate_proj", "up_proj"], "down": "down_proj"}})
    assert set(layout.values()) == {GATED}


def test_a_wrong_override_fails_the_permutation_proof():
    model = tiny_model("gpt2")
    mlp = {"first": ["c_fc"], "down": "c_proj"}
    with pytest.raises(
        UsageError, match=r"does not fit its weights: c_proj maps 32 -> 32, so each of \['c_attn'\] must map 32 -> 32"
    ):
        detect_layout(model, {"GPT2Attention": {"first": ["c_attn"], "down": "c_proj"}, "GPT2MLP": mlp})
    with pytest.raises(
        UsageError, match=r"transformer\.h\.0\.attn \(GPT2Attention\) mixes its neurons between c_attn and c_proj"
    ):
        # the attention's c_attn (q, k, v stacked) and c_proj declared as an FFN: the shapes fit, the function does not
        detect_layout(
            model, {"GPT2Attention": {"first": ["c_attn"], "down": "c_proj", "fused_chunks": 3}, "GPT2MLP": mlp}
        )
    with pytest.raises(
        UsageError, match="permuting the neurons of the detected FFNs changes LlamaForCausalLM's logits"
    ):
        # up_proj left out: permuting gate rows and down columns alone breaks the product
        detect_layout(tiny_model("llama"), {"first": ["gate_proj"], "down": "down_proj"})


def test_moe_models_are_refused_with_the_reason():
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_hidden_layers=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:  # experts without transformers' layout flags: lte.model.experts cannot read them
        del layer.mlp.experts.is_transposed
    with pytest.raises(UsageError, match=r"this MoE layout is not supported: MixtralForCausalLM .*3-D tensor") as info:
        inject_lte(model, LTEModelConfig(expert_size=8), progress=False)
    assert "register" not in str(info.value)


def test_layout_is_saved_with_the_run_and_reused_without_detecting(tmp_path, monkeypatch):
    model = inject_lte(tiny_model("gpt2"), LTEModelConfig(expert_size=8), progress=False)
    save_lte(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "lte_config.json").read_text())["ffn_hosts"]
    assert saved == layout_to_list({f"transformer.h.{i}.mlp": FORMER_REGISTRY["gpt2"] for i in range(2)})

    def no_detection(*args, **kwargs):
        raise AssertionError("a saved layout must not be detected again")

    monkeypatch.setattr("lte.model.inject.detect_layout", no_detection)
    loaded = load_lte(tmp_path / "ckpt")
    assert [layer.spec for layer in loaded.modules() if hasattr(layer, "lte_router")] == [FORMER_REGISTRY["gpt2"]] * 2
    with torch.device("meta"):  # a sharded/meta skeleton: widths come from the saved layout, no forward
        skeleton = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS["gpt2"]())
    check_expert_size(skeleton, 8, saved=saved)
    with pytest.raises(UsageError, match="expert_size=5 does not divide the FFN width 64"):
        check_expert_size(skeleton, 5, saved=saved)


def test_unregistered_architecture_checks_on_a_meta_model():
    config = transformers.Olmo2Config(
        hidden_size=32, intermediate_size=96, num_attention_heads=4, vocab_size=64, num_hidden_layers=2
    )
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    assert [c.path for c in candidates(skeleton)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    check_expert_size(skeleton, 16)
    with pytest.raises(UsageError, match="does not divide the FFN width 96"):
        check_expert_size(skeleton, 64)
    with pytest.raises(UsageError, match="meta device"):
        detect_layout(skeleton)


def test_unsupported_attn_implementation_names_the_supported_ones():
    check_attn_implementation(transformers.Gemma2ForCausalLM, None)
    check_attn_implementation(transformers.Gemma2ForCausalLM, "eager")
    with pytest.raises(
        UsageError,
        match=r"attn_implementation='sdpa' is not supported by Gemma2ForCausalLM; "
        r"choose one of eager, flash_attention_2",
    ):
        check_attn_implementation(transformers.Gemma2ForCausalLM, "sdpa")


def tiny_gemma2_config(**extra) -> transformers.Gemma2Config:
    """A two-layer Gemma2 (an FFN twice as wide as the model, 8-dim heads) for the recipe-level tests."""
    return transformers.Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=512,
        num_hidden_layers=2,
        **extra,
    )


def test_preflight_refuses_unsupported_attn_before_any_data(tmp_path, monkeypatch):
    from lte.pipeline import preflight
    from lte.training.config import load_recipe

    config = tiny_gemma2_config()
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    monkeypatch.chdir(REPO)
    args = ["recipe=tiny", f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path / 'gemma2'}"]
    with pytest.raises(UsageError, match="'sdpa' is not supported by Gemma2ForCausalLM"):
        preflight(load_recipe([*args, "model.attn_implementation=sdpa"], check_hardware=False))
    preflight(load_recipe(args, check_hardware=False))  # the default lets transformers choose
    assert not (tmp_path / "run").exists()


def test_recipe_layout_key_is_checked():
    from lte.training.config import load_recipe

    with pytest.raises(UsageError, match=r"model\.ffn_layout: an FFN layout needs 'first'"):
        load_recipe(["recipe=tiny", "output_dir=x", "model.ffn_layout={down: w2}"], check_hardware=False)
    recipe = load_recipe(
        ["recipe=tiny", "output_dir=x", "model.ffn_layout={MyMLP: {first: [w1, w3], down: w2}}"], check_hardware=False
    )
    assert recipe.model.ffn_layout == {"MyMLP": {"first": ["w1", "w3"], "down": "w2"}}
    assert recipe.model.attn_implementation is None


def test_lora_wrapped_projections_are_recognised():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    found = candidates(model)
    assert [c.path.split("model.")[-1] for c in found][:1] == ["layers.0.mlp"] and found[0].down == "down_proj"


def test_an_unregistered_architecture_trains_and_exports_with_the_recipe_defaults(tmp_path):
    """Gemma2 (rejects sdpa, which the recipes used to force) through `train.py recipe=tiny` and its
    export: detected in prepare, saved with every stage, read back by the export."""
    from conftest import STORIES, run_train

    config = tiny_gemma2_config(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    transformers.AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path / "gemma2")
    out = tmp_path / "run"
    run_train(out, f"model.name_or_path={tmp_path / 'gemma2'}", "lte.expert_size=8", "export.target_sparsity=0.3")
    hosts = [{"path": f"model.layers.{i}.mlp", **GATED.to_dict()} for i in range(2)]
    for stage in ("prepare", "stage1", "stage2"):
        assert json.loads((out / stage / "model" / "lte_config.json").read_text())["ffn_hosts"] == hosts
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["lte_ffn"]["hosts"] == [{k: h[k] for k in ("path", "first", "down", "fused_chunks")} for h in hosts]
    assert json.loads((out / "export" / "lte_export.json").read_text())["validation_error"] <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["olmo2", "bloom", "falcon_h1"])
def test_formerly_refused_decoders_train_and_export_through_the_tiny_recipe(tmp_path, model_type):
    """Decoders the class-name registry refused (and attention implementations the recipes used to force)
    go through `train.py recipe=tiny` (a few steps per stage) and its export, with no registration and no
    recipe key; the export's reload check passes and it lands near its target."""
    from conftest import STORIES, run_train
    from lte.tools.coverage import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    run_train(out, f"model.name_or_path={tmp_path / 'model'}", "lte.expert_size=8", "export.target_sparsity=0.3")
    report = json.loads((out / "export" / "lte_export.json").read_text())
    assert report["validation_error"] <= 1e-3
    assert abs(report["calibration_sparsity"] - 0.3) <= 0.02
    assert math.isfinite(report["sparse_ppl"])
    hosts = json.loads((out / "stage2" / "model" / "lte_config.json").read_text())["ffn_hosts"]
    assert hosts and all(h["first"] and h["down"] for h in hosts)


def test_a_model_whose_own_forward_fails_gets_one_message_naming_it(monkeypatch):
    """Detection's trace is the first forward of the unchanged model: when the model itself cannot run (a config
    with an unset special token id, as a Gemma 4 multimodal config without pad_token_id), the user gets one
    message naming the model and its error, not a traceback from inside transformers."""
    model = tiny_model("llama")

    def broken(*args, **kwargs):
        raise TypeError("where() received an invalid combination of arguments")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(UsageError, match=r"LlamaForCausalLM fails its own forward .*TypeError: where\(\).*config"):
        detect_layout(model)
