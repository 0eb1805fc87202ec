"""Injection across every supported FFN family (PEFT-style case table on tiny random models)."""

import pytest
import torch
from torch import nn

from conftest import FAMILY_CONFIGS, tiny_model
from lte import UsageError
from lte.model.inject import (
    LTEModelConfig,
    base_state_dict,
    inject_lte,
    load_lte,
    lte_layers,
    router_state_dict,
    save_lte,
    set_lte_routing,
    unload_lte,
)
from lte.model.layers import collect_router_scores, threshold_skipping
from lte.model.registry import feature_axes

FAMILIES = sorted(FAMILY_CONFIGS)


def tokens(seed=1):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def zero_ffn_reference(family):
    """The same model with every FFN's down projection zeroed: what 'all experts off' must give."""
    ref = inject_lte(tiny_model(family), LTEModelConfig(expert_size=8), progress=False)
    for layer in lte_layers(ref):
        layer.base_layer.get_submodule(layer.spec.down).weight.data.zero_()
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_grouping_keeps_outputs_and_modes_behave(family):
    x = tokens()
    reference = tiny_model(family)(x).logits
    model = inject_lte(tiny_model(family), LTEModelConfig(expert_size=8), progress=False)
    layers = lte_layers(model)
    assert len(layers) == 2 and all(layer.num_experts == 8 for layer in layers)
    # Permuting neurons into contiguous experts does not change the function.
    torch.testing.assert_close(model(x).logits, reference, atol=1e-5, rtol=1e-5)

    set_lte_routing(model, "hard")
    for layer in layers:
        layer.threshold = -1.0  # every expert selected
    torch.testing.assert_close(model(x).logits, reference, atol=1e-5, rtol=1e-5)
    for layer in layers:
        layer.threshold = 1.0  # no expert selected
    with collect_router_scores() as records:
        all_off = model(x).logits
    torch.testing.assert_close(all_off, zero_ffn_reference(family)(x).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(all_off, reference, atol=1e-3)
    assert [r.layer for r in records] == [0, 1]
    assert all(r.scores.shape == (14, 8) for r in records)

    # Soft mode scales each expert's neurons by its score: with scores forced to s, the FFN output is s times.
    set_lte_routing(model, "soft")
    for layer in layers:
        nn.init.zeros_(layer.lte_router.weight)
    soft = model(x).logits  # every score is sigmoid(0) = 0.5
    assert not torch.allclose(soft, reference, atol=1e-3) and not torch.allclose(soft, all_off, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_contiguous_clusters(family):
    model = tiny_model(family)
    inject_lte(model, LTEModelConfig(expert_size=8), progress=False)
    layer = lte_layers(model)[0]
    spec = layer.spec
    rows = layer.base_layer.get_submodule(spec.cluster_on).weight.detach()
    rows = rows.movedim(feature_axes(layer.base_layer.get_submodule(spec.cluster_on))[0], 0)[:64]
    rows = nn.functional.normalize(rows, dim=1)
    experts = rows.reshape(8, 8, -1)
    within = torch.einsum("eid,ejd->e", experts, experts).mean() / 64
    shuffled = rows[torch.randperm(64, generator=torch.Generator().manual_seed(0))].reshape(8, 8, -1)
    across = torch.einsum("eid,ejd->e", shuffled, shuffled).mean() / 64
    assert within > across  # k-means groups similar neurons


def test_unload_restores_plain_modules_and_state_dict_keys(tiny_llama):
    x = tokens()
    reference = tiny_llama(x).logits
    model = inject_lte(tiny_llama, LTEModelConfig(expert_size=16), progress=False)
    assert all(k.startswith("layers.") for k in router_state_dict(model))
    assert not any("base_layer" in k or "lte_router" in k for k in base_state_dict(model.state_dict()))
    set_lte_routing(model, "hard")
    unload_lte(model)
    assert not lte_layers(model)
    assert not any("lte_router" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(x).logits, reference, atol=1e-5, rtol=1e-5)
    # The hooks are gone: the permuted plain model is dense.
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def saved_hard_model(model, path):
    """An LTE model with trained-looking routers at threshold 0.4, saved to ``path`` under hard routing;
    returns the input and the logits a reload must give."""
    model = inject_lte(model, LTEModelConfig(expert_size=8, threshold=0.4), progress=False)
    for layer in lte_layers(model):
        nn.init.normal_(layer.lte_router.weight, std=0.5)
    set_lte_routing(model, "hard")
    x = tokens()
    expected = model(x).logits
    save_lte(model, path)
    return x, expected


def test_save_and_load_round_trip(tiny_llama, tmp_path):
    x, expected = saved_hard_model(tiny_llama, tmp_path / "ckpt")
    loaded = load_lte(tmp_path / "ckpt").eval()
    assert [layer.trained_threshold for layer in lte_layers(loaded)] == [0.4, 0.4]
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-6, rtol=1e-6)


def test_a_checkpoint_saved_before_the_threshold_rename_loads(tiny_llama, tmp_path):
    """lte_config.json used to say "tau"; it loads, with a warning, as the same threshold."""
    import json

    x, expected = saved_hard_model(tiny_llama, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "lte_config.json"
    saved = json.loads(path.read_text())
    saved["tau"] = saved.pop("threshold")
    path.write_text(json.dumps(saved))
    with pytest.warns(DeprecationWarning, match=r"LTEModelConfig\(tau=\.\.\.\) is deprecated, use threshold="):
        loaded = load_lte(tmp_path / "ckpt").eval()
    assert [(layer.threshold, layer.routing) for layer in lte_layers(loaded)] == [(0.4, "hard")] * 2
    assert vars(loaded.lte_config) == {k: v for k, v in saved.items() if k != "tau"} | {"threshold": 0.4}
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-6, rtol=1e-6)


def test_the_old_routing_names_still_work_with_a_warning(tiny_llama):
    """set_lte_mode and LTEMLP.mode/.tau are the deprecated names of set_lte_routing, .routing, .trained_threshold."""
    import lte

    model = inject_lte(tiny_llama, LTEModelConfig(expert_size=8), progress=False)
    with pytest.warns(DeprecationWarning, match="set_lte_mode is deprecated, use set_lte_routing"):
        lte.set_lte_mode(model, "soft")
    layer = lte_layers(model)[0]
    assert layer.routing == "soft"
    with pytest.warns(DeprecationWarning, match="LTEMLP.mode is deprecated, use LTEMLP.routing"):
        assert layer.mode == "soft"
    with pytest.warns(DeprecationWarning, match="LTEMLP.mode is deprecated"):
        layer.mode = "hard"
    assert layer.routing == "hard"
    with pytest.warns(DeprecationWarning, match="LTEMLP.tau is deprecated, use LTEMLP.trained_threshold"):
        assert layer.tau == layer.trained_threshold == 0.5
    with pytest.raises(ValueError, match="routing must be one of"):
        lte.set_lte_routing(model, "sparse")
    import lte.export.thresholds
    import lte.model.layers
    import lte.training.config

    for module, old, new in (
        (lte.model.layers, "MODES", "ROUTINGS"),
        (lte.training.config, "MODE_OF_STAGE", "ROUTING_OF_STAGE"),
        (lte.export.thresholds, "DENSE", "KEEP_ALL"),
    ):
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated, use {new}"):
            assert getattr(module, old) == getattr(module, new)


def test_unsupported_model_names_the_mlp_class_it_found():
    class ToyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = ToyMLP()

    with pytest.raises(UsageError, match="ToyMLP"):
        inject_lte(Toy(), LTEModelConfig(expert_size=2), progress=False)


def test_expert_size_must_divide_width(tiny_llama):
    with pytest.raises(UsageError, match=r"expert_size=5 does not divide the FFN width 64"):
        inject_lte(tiny_llama, LTEModelConfig(expert_size=5), progress=False)


def test_the_saved_router_init_says_what_the_routers_are(tmp_path):
    """``calibrated`` needs training tokens, which ``inject_lte`` has not: until ``init_routers`` runs with
    them the routers are nn.Linear's and lte_config.json says ``random``; after it, ``calibrated``."""
    from lte.model.router_init import init_routers

    model = inject_lte(tiny_model("llama"), LTEModelConfig(expert_size=8), progress=False)
    assert LTEModelConfig(expert_size=8).router_init == "calibrated"
    assert model.lte_config.router_init == "random"
    save_lte(model, tmp_path / "before")
    assert load_lte(tmp_path / "before").lte_config.router_init == "random"

    class Settings:
        router_init, router_init_sparsity, router_init_steps = "calibrated", 0.5, 5

    routers = [layer.lte_router.weight.clone() for layer in lte_layers(model)]
    agreement = init_routers(model, Settings(), lambda: [{"input_ids": tokens()}])
    assert len(agreement) == len(routers) and model.lte_config.router_init == "calibrated"
    assert any(
        not torch.equal(old, layer.lte_router.weight) for old, layer in zip(routers, lte_layers(model), strict=True)
    )


def test_a_tuned_threshold_never_sits_on_a_score_it_was_chosen_from():
    """Hard routing keeps `score > threshold`: a threshold equal to a calibration score flips that token's
    expert with the last bit of whichever kernel computes the score (an export failed its reload check so)."""
    scores = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    for k in (1, 100, 2048, 4095):
        t = threshold_skipping(scores, k)
        assert int((scores <= t).sum()) == k and not bool((scores == t).any())
        assert float(scores.kthvalue(k).values) < t < float(scores.kthvalue(k + 1).values)
    ties = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.9])
    assert threshold_skipping(ties, 2) == pytest.approx(0.55)  # tied values fall on one side, together
    assert threshold_skipping(ties, 5) == pytest.approx(0.9)  # nothing above: every value is skipped
    bf16 = scores.bfloat16()  # a bf16 router compares in bf16: the cut-off is a bf16 value, between the neighbours
    for k in (100, 2048):
        t, kth = threshold_skipping(bf16, k), bf16.kthvalue(k).values
        nxt = bf16[bf16 > kth].min()
        assert float(torch.tensor(t).bfloat16()) == t and float(kth) <= t < float(nxt)
        assert int((bf16 <= t).sum()) == int((bf16 <= kth).sum())  # the same tokens skipped as at the k-th value
    neighbours = torch.tensor([0.5, 0.5 + 2**-8], dtype=torch.bfloat16)  # adjacent in bf16: nothing between
    assert threshold_skipping(neighbours, 1) == 0.5
    spaced = torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16)
    assert float(spaced[0]) < threshold_skipping(spaced, 1) < float(spaced[1])  # a bf16 value between: taken
