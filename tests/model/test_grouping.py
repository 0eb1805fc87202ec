"""Balanced k-means and the neuron permutation."""

import torch

from lte.model.grouping import balanced_assign, balanced_kmeans


def test_balanced_assign_fills_every_cluster_exactly():
    sim = torch.randn(120, 12, generator=torch.Generator().manual_seed(0))
    labels = balanced_assign(sim, capacity=10)
    assert torch.equal(torch.bincount(labels, minlength=12), torch.full((12,), 10))


def test_balanced_assign_prefers_the_most_similar_cluster():
    # Two obvious groups: rows 0-3 love cluster 0, rows 4-7 love cluster 1.
    sim = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    assert balanced_assign(sim, capacity=4).tolist() == [0] * 4 + [1] * 4
    # Overloaded preference: everyone prefers cluster 0, the best-scoring two get it.
    sim = torch.tensor([[0.9, 0.0], [0.8, 0.1], [0.95, 0.2], [0.5, 0.4]])
    assert balanced_assign(sim, capacity=2).tolist() == [0, 1, 0, 1]


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 32, generator=g), dim=1)
    points = centers.repeat_interleave(8, dim=0) + 0.05 * torch.randn(48, 32, generator=g)
    perm = torch.randperm(48, generator=g)
    labels = balanced_kmeans(points[perm], 6, iters=20, seed=0)
    truth = torch.arange(6).repeat_interleave(8)[perm]
    # Same partition up to label names: every found cluster holds one planted cluster.
    for c in range(6):
        assert truth[labels == c].unique().numel() == 1
    assert torch.equal(torch.bincount(labels), torch.full((6,), 8))
