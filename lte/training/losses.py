"""LTE's regularisers and the sparsity they produce, from recorded router scores.

Eq. 4-6 of the paper, averaged over real tokens (padding excluded), experts and layers:

* efficiency ``L_eff = mean(G^2)`` (``"l2"``, the paper's formula) or ``mean(G)`` (``"l1"``);
* separability ``L_sep = mean(1 / ((G - threshold)^2 + eps))`` (the paper's tau is ``lte.threshold``); the
  paper has no ``eps``, but the term is singular at ``G = threshold`` without one.

FFN sparsity is the fraction of FFN neurons a token skips under hard routing; experts have
equal size, so it is the fraction of experts with ``G <= threshold`` (``lte.threshold`` unless ``lte export`` tuned it).
"""

from __future__ import annotations

import torch

from ..model.layers import RouterRecord


def _token_weights(mask: torch.Tensor | None, record: RouterRecord) -> torch.Tensor:
    """One weight per row of ``record.scores``: the token's mask entry (rows of routed experts are
    (token, expert) pairs, weighted by their token's entry)."""
    n_rows, device = record.scores.shape[0], record.scores.device
    if mask is None:
        return torch.ones(n_rows, device=device)
    weights = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if record.tokens is not None:
        weights = weights[record.tokens.to(device)]
    if weights.numel() != n_rows:
        raise ValueError(f"token mask has {weights.numel()} entries for {n_rows} routed tokens")
    return weights


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (rows weighted by ``weights``) and experts (columns)."""
    return (values.float().mean(dim=1) * weights).sum() / weights.sum().clamp_min(1.0)


def efficiency_loss(records: list[RouterRecord], mask: torch.Tensor | None = None, kind: str = "l2") -> torch.Tensor:
    terms = []
    for r in records:
        weights = _token_weights(mask, r)
        terms.append(_masked_mean(r.scores.float().square() if kind == "l2" else r.scores.float(), weights))
    return torch.stack(terms).mean()


def separability_loss(records: list[RouterRecord], mask: torch.Tensor | None = None, eps: float = 1e-2) -> torch.Tensor:
    terms = []
    for r in records:
        weights = _token_weights(mask, r)
        terms.append(_masked_mean(1.0 / ((r.scores.float() - r.trained_threshold).square() + eps), weights))
    return torch.stack(terms).mean()


@torch.no_grad()
def layer_sparsity(records: list[RouterRecord], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer fraction of FFN neurons skipped under hard routing, averaged over real tokens.

    Returns [num_layers] (records of the same layer, e.g. from several forwards, are pooled).
    """
    n_layers = 1 + max(r.layer for r in records)
    device = records[0].scores.device
    skipped = torch.zeros(n_layers, dtype=torch.float64, device=device)
    tokens = torch.zeros(n_layers, dtype=torch.float64, device=device)
    for r in records:
        weights = _token_weights(mask, r).double()
        off = (r.scores <= r.threshold).double().mean(dim=1)
        skipped[r.layer] += (off * weights).sum()
        tokens[r.layer] += weights.sum()
    return skipped / tokens.clamp_min(1.0)
