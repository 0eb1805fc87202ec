"""TEAL (Liu et al. 2024, FasterDecoding/TEAL): training-free magnitude sparsity of hidden states.

Each projection's input entries with ``|x| <= t`` are zeroed, so the weight columns they would
multiply are never read. ``t`` is set per layer and per projection input to the ``s`` quantile of
``|x|`` on calibration tokens (TEAL's uniform allocation: every sparsified input at the target
``s``); by default each quantile is taken with the thresholds before it already in place, so the
realised sparsity is the target (TEAL's release takes them all from the dense model). Two variants:

* ``teal`` (FFN only, matched to the FFN-sparsity methods): the FFN input (read by gate/up, TEAL's
  "h1") and the down projection's input ("h2");
* ``teal_all``: also the inputs of every attention projection, as TEAL deploys it.

Routed experts: the experts module's input (every selected expert reads the same sparse token), and
each selected expert's down-projection input, one threshold per MoE layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...model.registry import feature_axes
from .sites import Sparsified, cached, collect, ffn_sites, layer_inputs, quantile, run_batches


def _attention_projections(model: nn.Module, sites) -> list[nn.Module]:
    """Every Linear/Conv1D outside the FFNs, except the output embedding."""
    ffn = {id(m) for site in sites for m in site.host.modules()}
    head = model.get_output_embeddings()
    out = []
    for module in model.modules():
        if id(module) in ffn or module is head:
            continue
        try:
            feature_axes(module)
        except (TypeError, AttributeError):
            continue
        if getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            out.append(module)
    return out


def _threshold_hook(threshold: float, on_keep=None):
    def pre_hook(module, args):
        x = args[0]
        keep = x.abs() > threshold
        if on_keep is not None:
            on_keep(keep)
        return (x * keep.to(x.dtype), *args[1:])

    return pre_hook


@torch.no_grad()
def _projection_inputs(model: nn.Module, projections: list[nn.Module], calibration) -> list[torch.Tensor]:
    """|input| samples of each projection on the calibration data (every 4th token)."""
    inputs: dict[int, list[torch.Tensor]] = {id(p): [] for p in projections}
    grabs = [
        p.register_forward_pre_hook(lambda m, a: inputs[id(m)].append(a[0].detach().abs().float()[:, ::4].cpu()))
        for p in projections
    ]
    run_batches(model, calibration, grabs)
    return [torch.cat([v.reshape(-1) for v in inputs[id(p)]]) for p in projections]


@torch.no_grad()
def apply(
    model: nn.Module,
    target_sparsity: float,
    calibration,
    attention: bool = False,
    sequential: bool = True,
    cache: dict | None = None,
) -> Sparsified:
    """``sequential`` (the default here): each threshold is the quantile of the activations the
    model produces with the thresholds before it in place (the FFN input of layer l after layers
    < l are sparse; the down input after the FFN input is), so the realised sparsity matches the
    target. ``sequential=False`` is TEAL's released procedure: every threshold from the dense
    model's activations, which overshoots the target once earlier inputs are sparse."""
    sites = ffn_sites(model)
    handle = Sparsified("teal_all" if attention else "teal", model, sites)
    dense = (
        None if sequential else cached(cache, "acts", lambda: collect(model, calibration, {"input": None, "z": None}))
    )
    for site in sites:

        def count_input(keep, handle=handle, site=site):
            if handle.enabled:
                handle.count_input(site.index, keep)

        x = layer_inputs(model, site, calibration)[0] if sequential else dense["input"][site.index]
        t_in = quantile(x.abs(), target_sparsity)
        # gate and up read the same input: one threshold (routed experts: their module's input, once)
        readers = [site.host] if site.experts is not None else site.first
        for i, projection in enumerate(readers):
            hook = _threshold_hook(t_in, count_input if i == 0 else None)
            handle.hook(
                projection.register_forward_pre_hook(lambda m, a, hook=hook: hook(m, a) if handle.enabled else None)
            )
        z = layer_inputs(model, site, calibration)[1] if sequential else dense["z"][site.index]
        t_z = quantile(z.abs(), target_sparsity)
        handle.mask_neurons(site, lambda site, z, call, t=t_z: z.abs() > t)
    if attention:
        projections = _attention_projections(model, sites)
        inputs = cached(cache, "attention_inputs", lambda: _projection_inputs(model, projections, calibration))
        for projection, values in zip(projections, inputs, strict=True):
            hook = _threshold_hook(quantile(values, target_sparsity))
            handle.hook(
                projection.register_forward_pre_hook(lambda m, a, hook=hook: hook(m, a) if handle.enabled else None)
            )
    handle.reset()  # calibration forwards ran through the hooks already installed
    return handle
