"""CATS (Lee et al. 2024, ScalingIntelligence/CATS): contextual thresholding of the gate activation.

Per FFN, neurons with ``|act(gate(x))| <= t`` are zeroed; ``t`` is the ``s`` quantile of
``|act(gate(x))|`` over calibration tokens (the dense model), so each layer hits the target on
calibration data. The gate is still computed for every neuron (that is how the decision is made),
so the FLOPs count the whole gate; up and down skip the zeroed neurons. For a non-gated FFN the
activation output is the down projection's input itself. Inside routed experts the same rule runs
per (token, selected expert) pair, with one threshold per MoE layer over the pairs it ran.
"""

from __future__ import annotations

import torch
from torch import nn

from .sites import Sparsified, cached, collect, expert_activation, ffn_sites, quantile


@torch.no_grad()
def apply(model: nn.Module, target_sparsity: float, calibration, cache: dict | None = None) -> Sparsified:
    sites = ffn_sites(model)
    missing = [type(site.host).__name__ for site in sites if site.act is None]
    if missing:
        raise ValueError(f"CATS needs the FFN's activation module; none found in {missing[0]}")
    acts = cached(cache, "acts", lambda: collect(model, calibration, {"act": None}))
    handle = Sparsified("cats", model, sites)
    handle.gate_dense = True
    for site in sites:
        threshold = quantile(acts["act"][site.index].abs(), target_sparsity)
        if site.experts is not None:  # each selected expert's gate activation, for its tokens
            handle.mask_neurons(site, lambda site, z, call, t=threshold: expert_activation(site, call, z).abs() > t)
            continue
        decided: dict[str, torch.Tensor] = {}

        def decide(module, args, output, threshold=threshold, decided=decided):
            if handle.enabled:
                decided["keep"] = output.abs() > threshold

        handle.hook(site.act.register_forward_hook(decide))
        handle.mask_neurons(site, lambda site, z, call, decided=decided: decided.pop("keep"))
    return handle
