"""LTE inside routed experts (lte/model/experts.py): one mechanism over the layout facts of five families."""

import pytest
import torch

from lte.model.detect import detect_layout
from lte.model.experts import (
    LTEExperts,
    experts_hosts,
    moe_router_parameters,
    permute_expert_neurons,
    top_k_agreement,
    top_k_choices,
)
from lte.model.inject import LTEModelConfig, inject_lte, set_lte_routing, unload_lte
from lte.model.layers import collect_router_scores, lte_layers
from lte.training.losses import efficiency_loss, layer_sparsity, separability_loss
from moe_configs import MOE_CONFIGS, tiny_moe


def ids(n: int = 12, seed: int = 1):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_detection_finds_and_proves_the_routed_experts(family):
    model = tiny_moe(family)
    layout = detect_layout(model, group=4)
    routed = experts_hosts(model)
    assert len(routed) == 2 and set(routed) <= set(layout)
    facts = next(iter(routed.values()))
    assert facts.transposed == (family == "gpt_oss") and facts.bias == (family == "gpt_oss")
    assert facts.concatenated == (family != "gpt_oss") and facts.width == 16
    shared = [p for p in layout if p not in routed]
    assert len(shared) == (2 if family == "qwen2_moe" else 0)  # the shared expert is a dense FFN
    # depth order (a layer's index is its position): Qwen2-MoE's experts come before its shared expert
    depth = [name for name, _ in model.named_modules() if name in layout]
    assert list(layout) == depth


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_permuting_within_each_expert_keeps_logits_and_masking_a_group_changes_them(family):
    model = tiny_moe(family)
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        path, facts = next(iter(experts_hosts(model).items()))
        module = model.get_submodule(path)
        for expert in range(facts.num_experts):
            permute_expert_neurons(module, facts, expert, torch.randperm(facts.width))
        assert torch.allclose(model(x).logits, base, atol=1e-5)
        # the same neurons of one expert, now moved: their rows still exist; zero the first group of expert 0
        getattr(module, facts.down)[0].zero_()
        assert not torch.allclose(model(x).logits, base, atol=1e-4)


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_lte_experts_dense_equals_original_and_hard_routing_skips_groups(family):
    model = tiny_moe(family)
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    assert model.config._experts_implementation == "lte"
    layers = [layer for layer in lte_layers(model) if isinstance(layer, LTEExperts)]
    assert len(layers) == 2 and layers[0].num_experts == 4  # 16 neurons per expert: 4 groups of 4
    with torch.no_grad():
        assert torch.allclose(model(x).logits, base, atol=1e-4)  # dense: grouping is a permutation
        set_lte_routing(model, "hard")
        for layer in lte_layers(model):
            layer.threshold = -1.0  # every group runs: the expert-by-expert path equals the model
        assert torch.allclose(model(x).logits, base, atol=1e-4)
        for layer in lte_layers(model):
            layer.threshold = 0.5
        with collect_router_scores() as records:
            sparse = model(x).logits
    assert not torch.allclose(sparse, base, atol=1e-4)
    routed = [r for r in records if r.tokens is not None]
    assert len(routed) == 2
    k = model.config.num_experts_per_tok
    for record in routed:  # a row per (token, selected expert): the tokens each expert received
        assert record.scores.shape == (x.numel() * k, 4)
        assert torch.equal(torch.bincount(record.tokens, minlength=x.numel()), torch.full((x.numel(),), k))
    sparsity = layer_sparsity(records)
    assert ((sparsity > 0) & (sparsity < 1)).all()


def test_soft_routing_losses_reach_the_routers_over_the_tokens_each_expert_received():
    model = tiny_moe("qwen2_moe")
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    set_lte_routing(model, "soft")
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # padding: its (token, expert) rows carry no weight
    with collect_router_scores() as records:
        model(x, attention_mask=mask)
    loss = efficiency_loss(records, mask) + separability_loss(records, mask)
    loss.backward()
    experts = [layer for layer in lte_layers(model) if isinstance(layer, LTEExperts)]
    for layer in experts:
        grad = layer.lte_router.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # a row of a padded token contributes nothing: changing its score leaves the loss unchanged
    record = next(r for r in records if r.tokens is not None)
    padded = mask.reshape(-1)[record.tokens] == 0
    assert padded.any()
    before = efficiency_loss([record], mask)
    changed = type(record)(record.layer, record.scores.detach().clone(), 0.5, 0.5, record.tokens)
    changed.scores[padded] = 0.99
    assert torch.allclose(efficiency_loss([changed], mask), before)


def test_unload_restores_the_model_and_the_moe_router_is_found():
    model = tiny_moe("mixtral")
    model.set_experts_implementation("batched_mm")  # the user's choice, which unload_lte gives back
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        before = top_k_choices(model, [{"input_ids": x}])
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    routers = moe_router_parameters(model)
    assert [name for name, _ in routers] == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    set_lte_routing(model, "hard")
    with torch.no_grad():
        after = top_k_choices(model, [{"input_ids": x}])
    agreement = top_k_agreement(before, after)
    assert agreement["model.layers.0.mlp.experts"] == 1.0  # layer 0's input is unchanged by LTE
    assert 0.0 < agreement["model.layers.1.mlp.experts"] <= 1.0
    assert model.config._experts_implementation == "lte"
    unload_lte(model)
    assert model.config._experts_implementation == "batched_mm"
    with torch.no_grad():
        assert torch.allclose(model(x).logits, base, atol=1e-4)


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_the_exported_routed_experts_compute_what_the_trained_layers_did(family, tmp_path):
    """lte/export/remote/experts.py (the export's code) against lte/model/experts.py, every layout: the same
    hard-routed logits, and the original model's with lte_routing="dense"."""
    from lte.export.exporter import to_routed

    model = tiny_moe(family)
    x = ids()
    with torch.no_grad():
        original = model(x).logits
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    set_lte_routing(model, "hard")
    thresholds = [0.5] * len(lte_layers(model))
    with torch.no_grad():
        trained = model(x).logits
        to_routed(model, thresholds)
        assert model.config._experts_implementation == "lte_routed"
        assert torch.allclose(model(x).logits, trained, atol=1e-5)
        model.config.lte_routing = "dense"
        assert torch.allclose(model(x).logits, original, atol=1e-4)
    assert not torch.allclose(trained, original, atol=1e-3)


# The kernel path with both kernel sets on the families above, and with the CPU kernel on two more layouts from the
# coverage harness's tiny configs: transposed (E, H, 2I) experts (aria_text) and up-only experts (nemotron_h); the
# Triton interpreter takes 20-30 s on each of those, and the Python around both kernel sets is the same.
KERNEL_CASES = [(kernels, family) for kernels in ("cpu", "triton") for family in MOE_CONFIGS]
KERNEL_CASES += [("cpu", "aria_text"), ("cpu", "nemotron_h")]


def _tiny_layout(family: str):
    if family in MOE_CONFIGS:
        return tiny_moe(family)
    import transformers

    from lte.tools.coverage import tiny_config

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


# bf16: the one-token path sums the k experts in fp32 and rounds once, the masked path rounds each expert's output
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("device_kernels", "family"), KERNEL_CASES)
def test_the_kernel_path_computes_what_the_masked_path_does(family, dtype, tol, device_kernels, monkeypatch):
    """The export's kernel path (an expert with at most MAX_UNION_TOKENS tokens) against its masked path, on one
    token, a few tokens and more: the same logits, with only the kept groups' rows read. One token (decode) runs
    its k experts at once: one selection over every expert's rows per layer, no loop. The CPU kernel, and the
    Triton kernels a CUDA model runs (here forced onto CPU tensors, TRITON_INTERPRET=1). gpt-oss's interleaved,
    biased experts stay on the masked path."""
    import lte_kernels.cpu as cpu
    import lte_kernels.triton_ffn as triton_ffn
    from lte.export.exporter import to_routed
    from lte.export.remote import experts as remote, modeling_lte as modeling
    from lte.export.remote.modeling_lte import relayout_routed_ffns

    assert cpu.available() and triton_ffn.available()
    model = _tiny_layout(family).to(dtype)
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid", router_bias=True), progress=False)
    set_lte_routing(model, "hard")
    with torch.no_grad():
        to_routed(model, [0.5] * len(lte_layers(model)))
    hosts = [m for m in model.modules() if isinstance(getattr(m, "lte_router", None), remote.ExpertsRouter)]
    assert hosts
    with torch.no_grad():  # router biases that matter: a misread bias row changes which groups run
        for host in hosts:
            host.lte_router.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    one = hosts[0]
    assert one.is_transposed == (family in ("gpt_oss", "aria_text")) and one.has_gate == (family != "nemotron_h")
    per_expert = remote._up_rows(one, 0).shape[0]  # an expert's up rows ([gate; up] or up)
    every_expert = per_expert * remote._up(one).shape[0]  # every expert's, flattened: one token's call
    blocks = 2 if one.has_gate else 1
    read = {per_expert: [], every_expert: []}  # rows given -> (slots, groups read) per up-projection call
    kernel = cpu if device_kernels == "cpu" else triton_ffn
    matvec = cpu.slot_matvec if device_kernels == "cpu" else triton_ffn.expert_matvec
    matvec_t = cpu.slot_matvec_t if device_kernels == "cpu" else triton_ffn.expert_matvec_t

    def spy(x, rows, order, count, size, offset):
        experts = {remote._up(m).untyped_storage().data_ptr() for m in hosts}  # as relaid out
        if rows.untyped_storage().data_ptr() in experts:  # not a dense FFN's (a shared expert)
            read[rows.shape[0]].append((order.numel(), int(count)))
        return matvec(x, rows, order, count, size, offset)

    def bind_kernels(patch):  # what the export's copies bind from its lte_kernels_cpu.py / lte_kernels_triton.py
        patch.setattr(remote, "_cpu_kernel_available", cpu.available)
        patch.setattr(remote, "_cpu_dense_matmul_t", cpu.dense_matmul_t, raising=False)
        patch.setattr(modeling, "_cpu_kernel_available", cpu.available)  # modeling_lte chooses the kernels
        prefix = "_cpu" if device_kernels == "cpu" else "_triton"
        patch.setattr(modeling, f"{prefix}_select", kernel.select_experts, raising=False)
        patch.setattr(modeling, f"{prefix}_matvec", spy, raising=False)
        patch.setattr(modeling, f"{prefix}_matvec_t", matvec_t, raising=False)
        if device_kernels == "triton":
            patch.setattr(modeling, "_triton_available", triton_ffn.available)
            patch.setattr(modeling, "_FORCE_TRITON", True)
        relayout_routed_ffns(model)  # what from_pretrained does: the weights in the kernel's layout

    def run(x):
        calls = {rows: len(got) for rows, got in read.items()}
        with torch.no_grad():
            masked = model(x).logits
            with monkeypatch.context() as patch:
                bind_kernels(patch)
                kernel_logits = model(x).logits
        error = float((kernel_logits.float() - masked.float()).norm() / masked.float().norm())  # relative, whole
        assert error < tol, (family, x.shape, error)
        return {rows: got[calls[rows] :] for rows, got in read.items()}

    for x in (ids(1)[:1], ids(3), ids(12)):  # 1 token, 3 per sequence (<= 8 per expert), 24: some experts masked
        new = run(x)
        if x.numel() == 1 and family != "gpt_oss":  # one token: per layer, one call per up block, over all experts
            assert new[per_expert] == [] and len(new[every_expert]) == len(hosts) * blocks, new
    thresholds = model.config.lte_thresholds
    model.config.lte_thresholds = [2.0] * len(thresholds)  # no group kept anywhere: the kernels' count is 0
    new = run(ids(1)[:1])
    model.config.lte_thresholds = thresholds
    assert {count for _, count in new[every_expert]} == (set() if family == "gpt_oss" else {0}), new
    calls = {rows: len(got) for rows, got in read.items()}
    with monkeypatch.context() as patch:  # a forward that needs gradients (fine-tuning the export): masked
        bind_kernels(patch)
        model(ids(1)[:1], labels=ids(1)[:1]).loss.backward()
    assert {rows: len(got) for rows, got in read.items()} == calls
    if family == "gpt_oss":
        assert read == {per_expert: [], every_expert: []}
    else:  # both paths ran, and each left some groups unread
        for got in read.values():
            assert got and all(0 <= count <= slots for slots, count in got)
            assert any(count < slots for slots, count in got)
