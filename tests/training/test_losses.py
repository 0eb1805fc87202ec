"""The regularisers and the sparsity statistic, against hand-computed values."""

import pytest
import torch

from lte.model.layers import RouterRecord
from lte.training.losses import efficiency_loss, layer_sparsity, separability_loss


def records():
    layer0 = torch.tensor([[0.9, 0.1], [0.6, 0.2], [0.3, 0.8]])  # 3 tokens x 2 experts
    layer1 = torch.tensor([[0.5, 0.5], [0.7, 0.05], [0.99, 0.4]])
    return [RouterRecord(0, layer0, 0.5, 0.5), RouterRecord(1, layer1, 0.5, 0.5)]


def test_efficiency_loss_is_mean_over_tokens_experts_layers():
    all_scores = torch.stack([r.scores for r in records()])
    assert efficiency_loss(records(), kind="l2").item() == pytest.approx(all_scores.square().mean().item())
    assert efficiency_loss(records(), kind="l1").item() == pytest.approx(all_scores.mean().item())


def test_padding_tokens_are_excluded():
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    kept = torch.stack([r.scores[:2] for r in records()])
    assert efficiency_loss(records(), mask).item() == pytest.approx(kept.square().mean().item())
    expected_sep = (1 / ((kept - 0.5) ** 2 + 1e-2)).mean().item()
    assert separability_loss(records(), mask, eps=1e-2).item() == pytest.approx(expected_sep, rel=1e-6)


def test_separability_loss_formula_and_minimum():
    sep = separability_loss(records(), eps=1e-3).item()
    g = torch.stack([r.scores for r in records()])
    assert sep == pytest.approx((1 / ((g - 0.5) ** 2 + 1e-3)).mean().item(), rel=1e-6)
    saturated = [RouterRecord(0, torch.tensor([[0.0, 1.0]]), 0.5, 0.5)]
    assert separability_loss(saturated, eps=0.0).item() == pytest.approx(
        4.0
    )  # the paper's floor at threshold (tau) = 0.5


def test_layer_sparsity_counts_experts_at_or_below_the_threshold():
    per_layer = layer_sparsity(records())
    # layer 0: off = 0.1, 0.2, 0.3 -> 3 of 6; layer 1: 0.5 (<= threshold), 0.5, 0.05, 0.4 -> 4 of 6
    assert per_layer.tolist() == pytest.approx([3 / 6, 4 / 6])
    masked = layer_sparsity(records(), torch.tensor([1, 1, 0]))
    assert masked.tolist() == pytest.approx([2 / 4, 3 / 4])
