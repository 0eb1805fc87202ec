"""Held-out perplexity and realised FFN sparsity of a (possibly LTE) causal LM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..model.layers import collect_router_scores
from .losses import layer_sparsity


@dataclass
class EvalResult:
    nll: float
    tokens: int
    per_layer_sparsity: list[float] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def sparsity(self) -> float | None:
        return sum(self.per_layer_sparsity) / len(self.per_layer_sparsity) if self.per_layer_sparsity else None


def pad_rows(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of different lengths: ``attention_mask`` 0 and labels -100 on the padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def evaluate_layouts(
    model, layouts: dict, pad_token_id: int, batch_size: int = 8, what: str = ""
) -> dict[str, EvalResult]:
    """:func:`evaluate_lm` on the held-out documents in each layout (:func:`lte.training.data.layout_rows`):
    the same tokens scored after BOS, after EOS and packed. Rows are batched by length."""
    results = {}
    for layout, rows in layouts.items():
        rows = list(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        rows = [rows[i] for i in order]
        batches = [pad_rows(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
        results[layout] = evaluate_batches(model, batches, desc=f"Held-out layout {layout} {what}".rstrip())
    return results


def evaluate_lm(model, dataset, collator, batch_size: int = 8, desc: str = "Evaluating") -> EvalResult:
    """Token-weighted NLL over every label of ``dataset``; sparsity over the same tokens."""
    return evaluate_batches(model, DataLoader(dataset, batch_size=batch_size, collate_fn=collator), desc)


@torch.no_grad()
def evaluate_batches(model, batches, desc: str | None = None) -> EvalResult:
    """:func:`evaluate_lm` over already collated batches (a progress bar only with ``desc``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    skipped = tokens_routed = None
    for batch in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with collect_router_scores() as records:
            logits = model(**batch).logits.float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
        if records:
            mask = batch.get("attention_mask")
            per_layer = layer_sparsity(records, mask)
            n = mask.sum().item() if mask is not None else batch["input_ids"].numel()
            skipped = per_layer * n if skipped is None else skipped + per_layer * n
            tokens_routed = n if tokens_routed is None else tokens_routed + n
    model.train(was_training)
    per_layer = [] if skipped is None else (skipped / tokens_routed).tolist()
    return EvalResult(total_nll / max(total_tokens, 1), total_tokens, per_layer)
