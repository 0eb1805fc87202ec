"""GRIFFIN (Dong et al. 2024, hdong920/GRIFFIN): experts chosen per sequence from the prompt.

The prompt runs dense. Per FFN, the prompt's down-projection inputs ``Z`` are normalised per token
to unit L2 norm, each neuron is scored by the L2 norm of its column over the prompt tokens, and
the top ``int(width * (1 - s))`` neurons are kept for every later token of that sequence (GRIFFIN's
``density`` is the kept fraction). No calibration data.

Evaluation protocol (the research note's option for perplexity on long text): each evaluation
block's first ``prefix`` positions are the prompt (dense); the experts chosen from them apply to
every later position, and the harness scores the predictions those positions make, for every
method. This is what generation does token by token, except that GRIFFIN's first generated token
comes from the dense prompt forward; here it is predicted sparse too, as in GRIFFIN's own
classification mode (which sparsifies the last position). One deviation from the released code: the
per-token norm is clamped at 1e-12, so an all-zero activation row (possible with ReLU) does not give NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from .sites import Sparsified, dense_only, ffn_sites


def select(z_prompt: torch.Tensor, kept: int) -> torch.Tensor:
    """[B, P, width] prompt activations -> [B, width] bool mask of the ``kept`` top neurons."""
    normalised = z_prompt.float() / z_prompt.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = normalised.norm(dim=1)
    keep = torch.zeros_like(score, dtype=torch.bool)
    if kept > 0:
        keep.scatter_(1, score.topk(kept, dim=1).indices, True)
    return keep


@torch.no_grad()
def apply(model: nn.Module, target_sparsity: float, calibration=None, cache: dict | None = None) -> Sparsified:
    """``calibration`` and ``cache`` are unused: GRIFFIN needs no calibration."""
    sites = ffn_sites(model)
    dense_only(sites, "GRIFFIN")
    handle = Sparsified("griffin", model, sites)
    handle.reads_prompt = True

    def rule(site, z, call):
        prefix = handle.prefix
        if prefix <= 0 or z.shape[1] <= prefix:
            raise ValueError("GRIFFIN needs a prompt: set Sparsified.prefix to the prompt length (< sequence length)")
        keep = torch.ones(z.shape, dtype=torch.bool, device=z.device)
        keep[:, prefix:] = select(z[:, :prefix], int(site.width * (1 - target_sparsity) + 1e-9))[:, None, :]
        return keep

    for site in sites:
        handle.mask_neurons(site, rule)
    return handle
