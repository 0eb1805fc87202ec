"""LoRA and QLoRA (PEFT + bitsandbytes on the CPU): adapters respect the routing, routers train in
full in float32, and merging gives exactly the model that was trained."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import REPO, run_train, tiny_model
from lte.core.errors import UsageError
from lte.model.experts import experts_hosts, moe_router_parameters
from lte.model.inject import LTEModelConfig, inject_lte, load_lte, lte_layers, save_lte, set_lte_routing
from lte.training.adapters import add_lora, check_lora, merge_adapter, quantization_config
from lte.training.config import LoraArgs
from moe_configs import MOE_CONFIGS, tiny_moe

LORA = LoraArgs(r=4, alpha=8, dropout=0.0)


@pytest.fixture
def lte_checkpoint(tmp_path):
    model = inject_lte(tiny_model("llama"), LTEModelConfig(expert_size=8, router_init="centroid"), progress=False)
    save_lte(model, tmp_path / "src")
    return tmp_path / "src"


def tokens():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def pretend_trained(peft_model, seed=0):
    """Move every trainable tensor (LoRA factors, router copies) as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_merged_checkpoint_computes_what_the_adapter_model_computed(lte_checkpoint, tmp_path, mode):
    model = load_lte(lte_checkpoint)
    set_lte_routing(model, mode)
    for layer in lte_layers(model):
        layer.threshold = 0.5
    peft_model = add_lora(model, LORA, train_routers=True)
    pretend_trained(peft_model)
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(tokens()).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    merged = merge_adapter(lte_checkpoint, tmp_path / "adapter")
    set_lte_routing(merged, mode)
    for layer in lte_layers(merged):
        layer.threshold = 0.5
    with torch.no_grad():
        got = merged(tokens()).logits
    # In hard mode this also checks that a skipped expert's neurons do not reach the output through
    # the LoRA branch of down_proj: the merged model masks the whole projection input.
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        original = load_lte(lte_checkpoint)
        set_lte_routing(original, mode)
        assert not torch.allclose(original(tokens()).logits, got, atol=1e-3)  # the adapter changed the model
    assert all(type(layer.lte_router) is torch.nn.Linear for layer in lte_layers(merged))


def test_routers_train_in_full_in_float32_and_everything_else_only_through_lora(lte_checkpoint):
    model = load_lte(lte_checkpoint, dtype=torch.bfloat16)
    set_lte_routing(model, "soft")
    peft_model = add_lora(model, LORA, train_routers=True)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    routers = {n: p for n, p in trainable.items() if "lte_router" in n}
    assert routers and all("modules_to_save" in n and p.dtype == torch.float32 for n, p in routers.items())
    assert all("lora_" in n for n in trainable if n not in routers)
    assert any(".mlp.base_layer.down_proj.lora_A" in n for n in trainable)  # FFN projections are adapted
    assert any(".self_attn.q_proj.lora_A" in n for n in trainable)  # so is attention
    assert not any("lte_router.lora_" in n or "lm_head.lora" in n for n in trainable)

    frozen = add_lora(load_lte(lte_checkpoint), LORA, train_routers=False)
    assert not any("lte_router" in n for n, p in frozen.named_parameters() if p.requires_grad)


def test_qlora_base_is_4bit_and_routers_stay_trainable_float32(lte_checkpoint):
    import bitsandbytes as bnb

    qlora = LoraArgs(r=4, alpha=8, dropout=0.0, load_in_4bit=True)
    model = load_lte(lte_checkpoint, dtype=torch.float32, quantization_config=quantization_config(qlora, torch.float32))
    layer = lte_layers(model)[0]
    assert isinstance(layer.base_layer.gate_proj, bnb.nn.Linear4bit)  # the frozen base really is 4-bit
    assert type(layer.lte_router) is torch.nn.Linear and layer.num_experts == 8  # routers are not quantized
    set_lte_routing(model, "soft")
    peft_model = add_lora(model, qlora, train_routers=True)
    peft_model.train()
    loss = peft_model(tokens(), labels=tokens()).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    router_grads = [g for n, g in grads.items() if "lte_router" in n]
    lora_grads = [g for n, g in grads.items() if "lora_B" in n]
    assert router_grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in router_grads)
    assert lora_grads and all(g is not None for g in lora_grads)


def moe_checkpoint(family, path, **sizes):
    model = tiny_moe(family)
    if sizes:
        config = MOE_CONFIGS[family]()
        for key, value in sizes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    save_lte(model, path)
    return path


# qwen3_moe with a dense FFN in layer 0 (mlp_only_layers): PEFT rewrites the targets of this family for adapters
# trained on transformers 4, and that rewrite would take the dense FFN's gate_proj/up_proj/down_proj for experts.
FAMILIES = {**{family: {} for family in MOE_CONFIGS}, "qwen3_moe-dense-layer": {"mlp_only_layers": [0]}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_adapts_every_routed_expert_and_merges_into_them(family, tmp_path):
    """Each routed experts module's up and down weights get a LoRA (PEFT target_parameters: rank r per expert)
    whatever PEFT's own rewrite for the family would do, and dense FFNs keep theirs; the MoE router is never
    adapted (frozen, or trained in full with lte.train_moe_router); merging gives the model that was
    trained, with the experts changed."""
    source = moe_checkpoint(family.split("-")[0], tmp_path / "src", **FAMILIES[family])
    model = load_lte(source)
    set_lte_routing(model, "soft")
    experts = experts_hosts(model)
    peft_model = add_lora(model, LORA, train_routers=True)
    trainable = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    for path, layout in experts.items():
        # nested ParamWrappers: the outer one adapts one tensor, the inner one the other; r per expert
        factors = [n for n in trainable if n.startswith(path + ".") and "lora_A" in n]
        assert len(factors) == 2, factors
        assert all(trainable[n].shape[0] == LORA.r * layout.num_experts for n in factors)
    assert not any(n.startswith(r.rpartition(".")[0] + ".") for n in trainable for r, _ in moe_router_parameters(model))
    assert not any("lora_" in n and "lte_router" in n for n in trainable)
    paths = {id(m): n for n, m in model.named_modules()}
    dense = [layer for layer in lte_layers(model) if not getattr(layer, "routes_experts", False)]
    assert len(dense) == (1 if FAMILIES[family] else 2 if family == "qwen2_moe" else 0)  # + shared experts
    for layer in dense:  # a dense FFN's (or shared expert's) projections keep their own LoRA
        for name in (*layer.spec.first, layer.spec.down):
            assert f"{paths[id(layer)]}.base_layer.{name}.lora_A.default.weight" in trainable, (name, sorted(trainable))
    pretend_trained(peft_model)
    with torch.no_grad():
        trained = peft_model(tokens()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(source, tmp_path / "adapter")
    set_lte_routing(merged, "soft")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()).logits, trained, atol=1e-5, rtol=1e-4)
    original = load_lte(source)
    for path, layout in experts.items():
        for name in (layout.up, layout.down):
            before = getattr(original.get_submodule(path), name)
            after = getattr(merged.get_submodule(path), name)
            assert after.shape == before.shape and not torch.allclose(after, before, atol=1e-3), (path, name)
    for (name, before), (_, after) in zip(moe_router_parameters(original), moe_router_parameters(merged), strict=True):
        assert torch.equal(before, after), name  # the model's own router: frozen


def test_the_moe_router_trains_in_full_under_lora_when_the_recipe_trains_it(tmp_path):
    source = moe_checkpoint("mixtral", tmp_path / "src")
    peft_model = add_lora(load_lte(source), LORA, train_routers=False, train_moe_router=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum("mlp.gate.modules_to_save" in n for n in trainable) == 2  # both layers' routers, whole
    assert not any("lte_router" in n for n in trainable) and not any("gate.lora_" in n for n in trainable)
    pretend_trained(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(source, tmp_path / "adapter")
    for (name, before), (_, after) in zip(
        moe_router_parameters(load_lte(source)), moe_router_parameters(merged), strict=True
    ):
        assert not torch.allclose(before, after, atol=1e-3), name


def test_qlora_on_an_moe_model_adapts_the_experts_over_a_4bit_base(tmp_path):
    """bitsandbytes quantizes the linear layers; the experts' 3-D tensors stay as loaded (bf16 here: PEFT's
    k-bit preparation would upcast them to float32, most of an MoE model's memory) and get LoRA factors that
    receive gradients."""
    import bitsandbytes as bnb

    source = moe_checkpoint("qwen3_moe", tmp_path / "src")
    qlora = LoraArgs(r=4, alpha=8, dropout=0.0, load_in_4bit=True)
    compute = torch.bfloat16
    model = load_lte(source, dtype=compute, quantization_config=quantization_config(qlora, compute))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    set_lte_routing(model, "soft")
    peft_model = add_lora(model, qlora, train_routers=True)
    experts = {n: p for n, p in peft_model.named_parameters() if n.endswith(("_proj", "_proj.weight")) and p.dim() == 3}
    assert len(experts) == 4 and all(p.dtype == compute and not p.requires_grad for p in experts.values()), {
        n: p.dtype for n, p in experts.items()
    }
    peft_model.train()
    peft_model(tokens(), labels=tokens()).loss.backward()
    named = peft_model.named_parameters()
    expert_grads = {n: p.grad for n, p in named if "mlp.experts.base_layer" in n and "lora_B" in n}
    assert len(expert_grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in expert_grads.values())


def test_lora_settings_the_model_cannot_take_are_refused_before_any_work():
    moe, dense = tiny_moe("qwen3_moe"), tiny_model("llama")
    with pytest.raises(UsageError, match=r"lora.dropout=0.05: .*routed experts.*set lora.dropout=0"):
        check_lora(moe, LoraArgs(r=4))
    check_lora(moe, LoraArgs(r=4, target_parameters=[]))  # the experts left frozen: dropout is fine
    check_lora(moe, LoraArgs(r=4, dropout=0.0))
    check_lora(dense, LoraArgs(r=4))  # a dense model has no experts to adapt
    check_lora(moe, LoraArgs(r=4, dropout=0.0, target_parameters=["experts.down_proj"]))  # a suffix of a name
    with pytest.raises(UsageError, match=r"'all-experts' stands alone"):
        check_lora(moe, LoraArgs(r=4, dropout=0.0, target_parameters=["all-experts", "down_proj"]))
    with pytest.raises(UsageError, match=r"'w1' names no parameter of .*end in experts.down_proj, experts.gate_up"):
        check_lora(moe, LoraArgs(r=4, dropout=0.0, target_parameters=["w1"]))
    with pytest.raises(UsageError, match=r"'w1' names no parameter .* it has no 3-D weights"):
        check_lora(dense, LoraArgs(r=4, dropout=0.0, target_parameters=["w1"]))
    # AFMoE keeps a router parameter (expert_bias [E]) on the MoE block itself: LoRA cannot train it in full
    from lte.tools.coverage import tiny_config

    with torch.device("meta"):
        afmoe = transformers.AutoModelForCausalLM.from_config(tiny_config("afmoe"))
    check_lora(afmoe, LoraArgs(r=4, dropout=0.0))  # frozen, as by default: fine
    with pytest.raises(UsageError, match=r"lte.train_moe_router=true with LoRA: .*mlp.expert_bias .*lora.r=0"):
        check_lora(afmoe, LoraArgs(r=4, dropout=0.0), train_moe_router=True)
    check_lora(tiny_moe("mixtral"), LoraArgs(r=4, dropout=0.0), train_moe_router=True)  # mlp.gate: a module


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_lora_recipe_end_to_end_exports_a_plain_lte_model(tmp_path, variant):
    out = tmp_path / "run"
    extra = ["lora.r=8", "train.learning_rate=1e-3", "export.allocation=uniform"]
    if variant == "qlora":
        extra.append("lora.load_in_4bit=true")
    proc = run_train(out, *extra)
    assert ("over a 4-bit base" in proc.stderr) == (variant == "qlora")
    assert "routers trained in full" in proc.stderr and "routers frozen" in proc.stderr
    stage1_adapter = load_file(str(out / "stage1" / "adapter" / "adapter_model.safetensors"))
    assert any("lte_router" in k for k in stage1_adapter) and any("lora_A" in k for k in stage1_adapter)
    stage2_adapter = load_file(str(out / "stage2" / "adapter" / "adapter_model.safetensors"))
    assert not any("lte_router" in k for k in stage2_adapter)  # routers frozen in stage 2
    # Stage models are plain LTE checkpoints: merged weights, no adapter keys.
    for stage in ("stage1", "stage2"):
        weights = load_file(str(out / stage / "model" / "model.safetensors"))
        assert not any("lora" in k or "base_layer" in k for k in weights)
    prepared = load_file(str(out / "prepare" / "model" / "lte_routers.safetensors"))
    trained = load_file(str(out / "stage1" / "model" / "lte_routers.safetensors"))
    assert not torch.equal(prepared["layers.0.weight"], trained["layers.0.weight"])  # routers trained
    base = load_file(str(out / "prepare" / "model" / "model.safetensors"))
    merged = load_file(str(out / "stage2" / "model" / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(base[key], merged[key])  # the adapters were merged into the weights
    losses = [
        h["loss"]
        for h in json.loads((out / "stage1" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        if "task_loss" in h
    ]
    assert losses[-1] < losses[0]
    exported = json.loads((out / "export" / "lte_export.json").read_text())
    assert abs(exported["heldout_sparsity"] - 0.5) < 0.03 and exported["validation_error"] < 1e-4


_WITHOUT_QUANTIZATION = r"""
import sys
from lte.cli import main, train_main
assert main(["recipes"]) == 0
assert train_main(["recipe=tiny", f"output_dir={sys.argv[1]}", "restart_from=none"]) == 2  # after the run's imports
from lte.model.inject import load_lte
from lte.training.adapters import add_lora
from lte.training.config import LoraArgs
add_lora(load_lte(sys.argv[2]), LoraArgs(r=4, alpha=8, dropout=0.0), train_routers=True)
print(sorted(m for m in sys.modules if m.split(".")[0] == "bitsandbytes"))
"""


def test_runs_without_quantization_never_import_bitsandbytes(lte_checkpoint, tmp_path):
    """peft imports bitsandbytes eagerly, and bitsandbytes' CPU backend on AVX512-BF16 machines asks the
    hub for a kernel at import: offline, every command warned about it. `lte recipes`, `train.py
    recipe=tiny` through all of its imports (a bad restart_from stops it after them) and LoRA on an
    unquantized model never load bitsandbytes and say nothing of it or of the hub's kernels. (Whether the hub's
    `kernels` package is imported is transformers' choice: it imports any version it supports, at import.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_QUANTIZATION, str(tmp_path / "run"), str(lte_checkpoint)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert "bitsandbytes" not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr[-3000:]
    assert "restart_from=none must be one of" in proc.stderr  # it did reach the pipeline
