"""Warm-start the routers on calibration tokens before stage 1 (an addition to the paper).

The paper leaves router initialisation open. A random router starts stage 1 from an
arbitrary split of experts that the separability loss then freezes in place, and a short
fine-tune cannot undo it. Instead, for each layer we run the dense model on a few
calibration blocks, score each (token, expert) pair by the expert's weighted activation
norm ``|| h_e * ||W_down[:, e]|| ||`` (its approximate contribution to the FFN output), label
the pairs above the layer's ``sparsity`` quantile as "needed", and fit the router to those
labels by logistic regression. Stage 1 then refines this router with LTE's own losses,
which reallocate sparsity across layers and tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import LTEMLP, lte_layers
from .registry import feature_axes

# How routers start; ``lte.router_init`` picks one and :func:`init_routers` alone acts on it.
ROUTER_INITS = {
    "calibrated": "fit routers to expert importance on training tokens before stage 1",
    "centroid": "the experts' mean gate rows",
    "random": "nn.Linear init",
}


def init_routers(model: nn.Module, settings, calibration=None) -> list[float] | None:
    """Initialise the freshly grouped model's routers as ``settings.router_init`` says (``settings``:
    an :class:`~lte.model.inject.LTEModelConfig` or the recipe's ``lte`` group). ``calibration``: a callable
    returning the calibration batches, which only ``calibrated`` needs; without it that init waits
    (:func:`lte.model.inject.inject_lte` has no data; the pipeline calls again with it, which repeats the
    deterministic centroid init to the same values). Returns the
    calibrated init's per-layer label agreement, else None."""
    if settings.router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {settings.router_init!r}")
    if settings.router_init == "centroid":
        for layer in lte_layers(model):
            layer.init_router_from_experts(settings.router_init_scale)
    elif settings.router_init == "calibrated":
        saved = getattr(model, "lte_config", None)  # what lte_config.json will say the routers are
        if calibration is None:  # they stay as nn.Linear made them until a call with data: say so
            if saved is not None:
                saved.router_init = "random"
            return None
        for layer in lte_layers(model):  # routed experts: an expert may get no calibration token; centroids
            if getattr(layer, "routes_experts", False):
                layer.init_router_from_experts(settings.router_init_scale)
        agreement = calibrate_routers(model, calibration(), settings.router_init_sparsity, settings.router_init_steps)
        if saved is not None:
            saved.router_init = "calibrated"
        return agreement
    return None


def _down_column_norms(layer: LTEMLP) -> torch.Tensor:
    down = layer.base_layer.get_submodule(layer.spec.down)
    _, in_axis = feature_axes(down)
    return down.weight.detach().float().norm(dim=1 - in_axis)


@torch.no_grad()
def collect_router_targets(model: nn.Module, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (router inputs [T, d], expert importance [T, N]) on the calibration batches."""
    layers = [layer for layer in lte_layers(model) if not getattr(layer, "routes_experts", False)]
    routings = [layer.routing for layer in layers]
    inputs = {layer.layer_index: [] for layer in layers}
    importance = {layer.layer_index: [] for layer in layers}
    handles = []
    for layer in layers:
        layer.routing = "dense"
        first = layer.base_layer.get_submodule(layer.spec.first[0])
        down = layer.base_layer.get_submodule(layer.spec.down)
        weights = _down_column_norms(layer)

        def take_input(module, args, index=layer.layer_index):
            inputs[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        def take_importance(module, args, layer=layer, weights=weights):
            h = args[0].detach().float() * weights.to(args[0].device)
            h = h.reshape(-1, layer.num_experts, layer.expert_size)
            importance[layer.layer_index].append(h.norm(dim=-1).cpu())

        handles += [first.register_forward_pre_hook(take_input), down.register_forward_pre_hook(take_importance)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="Calibrating routers", leave=False):
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
            )
    finally:
        for handle in handles:
            handle.remove()
        for layer, routing in zip(layers, routings, strict=True):
            layer.routing = routing
        model.train(was_training)
    return {i: (torch.cat(inputs[i]), torch.cat(importance[i])) for i in inputs}


def fit_router(
    router: nn.Linear, x: torch.Tensor, importance: torch.Tensor, sparsity: float, steps: int = 200, lr: float = 1e-2
) -> float:
    """Logistic regression of "expert needed" (importance above the ``sparsity`` quantile) on x.

    Returns the fitted router's agreement with the labels.
    """
    threshold = torch.quantile(importance.flatten()[: 2**24], sparsity)
    labels = (importance > threshold).float()
    weight = router.weight.detach().float().clone().requires_grad_(True)
    bias = router.bias.detach().float().clone().requires_grad_(True) if router.bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        logits = x @ weight.T + (bias if bias is not None else 0)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        router.weight.copy_(weight)
        if bias is not None:
            router.bias.copy_(bias)
        logits = x @ weight.T + (bias if bias is not None else 0)
        return ((logits > 0).float() == labels).float().mean().item()


def calibrate_routers(
    model: nn.Module, batches, sparsity: float = 0.5, steps: int = 200, lr: float = 1e-2
) -> list[float]:
    """Fit every router to its layer's expert importance; returns per-layer label agreement."""
    targets = collect_router_targets(model, batches)
    agreement = []
    for layer in tqdm(lte_layers(model), desc="Fitting routers", leave=False):
        if layer.layer_index not in targets:  # routed experts keep their centroid init
            continue
        x, importance = targets[layer.layer_index]
        router = layer.lte_router
        device, dtype = router.weight.device, router.weight.dtype
        router.float().cpu()
        torch.manual_seed(layer.layer_index)
        agreement.append(fit_router(router, x, importance, sparsity, steps, lr))
        router.to(device=device, dtype=dtype)
    return agreement
