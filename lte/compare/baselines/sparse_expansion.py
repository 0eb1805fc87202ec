"""Sparse Expansion (Sawmya et al. 2024, Shavit-Lab/Sparse-Expansion): input-routed pruned experts.

Every FFN linear layer becomes K copies of itself, each pruned one-shot by SparseGPT with the
Hessian of one cluster of its calibration inputs; each token runs the copy of its nearest
cluster. As in the reference code:

* two routers per FFN: one on the FFN input, shared by gate and up (or the input projection),
  one on the down projection's input, fitted on the block's *dense* intermediate activations;
* a router is PCA to ``d_in // pca_factor`` components (``pca_factor=0``: no PCA) then k-means;
  routing is the nearest centroid (hard top-1);
* layers are built in depth order, each calibrated on the outputs of the already-expanded
  layers before it (sequential error propagation).

Deviations, for a CPU-sized reimplementation: k-means is ours (k-means++ seeding, 3 restarts,
Lloyd iterations) instead of cuML with 100 restarts; PCA is ``torch.pca_lowrank``; a layer is
calibrated on at most ``MAX_TOKENS`` tokens (the reference uses 128 windows of 2,048-4,096), so with
16 clusters each Hessian sees about a thousand tokens and SparseGPT's dampening does more work; an
empty cluster uses the layer's whole Hessian. The
realised sparsity reported is the weight sparsity of the copies each token ran (the
comparison's FLOPs include the routers: PCA projection and centroid distances).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...model.registry import feature_axes
from .sites import FFNSite, Sparsified, dense_only, ffn_sites, layer_inputs
from .sparsegpt import prune

MAX_TOKENS = 16384  # calibration tokens a layer's routers and Hessians are built from


def kmeans(points: torch.Tensor, k: int, iters: int = 50, restarts: int = 3, seed: int = 0) -> torch.Tensor:
    """Centroids [k, dim] of Euclidean k-means (k-means++ seeding; the best of ``restarts``)."""
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centroids = points[torch.randint(len(points), (1,), generator=generator)]
        while len(centroids) < k:
            d2 = torch.cdist(points, centroids).min(dim=1).values.square()
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            centroids = torch.cat([centroids, points[torch.multinomial(probs, 1, generator=generator)]])
        for _ in range(iters):
            labels = torch.cdist(points, centroids).argmin(dim=1)
            counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1).float()
            updated = torch.zeros_like(centroids).index_add_(0, labels, points) / counts
            empty = torch.bincount(labels, minlength=k) == 0
            updated[empty] = centroids[empty]
            if torch.allclose(updated, centroids):
                break
            centroids = updated
        inertia = float(torch.cdist(points, centroids).min(dim=1).values.square().sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


@dataclass
class Router:
    """PCA (mean, components) then nearest centroid."""

    mean: torch.Tensor
    components: torch.Tensor  # [d_in, c]
    centroids: torch.Tensor  # [K, c]

    @classmethod
    def fit(cls, x: torch.Tensor, clusters: int, pca_factor: int, seed: int) -> Router:
        mean = x.mean(dim=0)
        centered = x - mean
        if pca_factor:
            q = max(1, x.shape[1] // pca_factor)
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            try:
                _, _, v = torch.pca_lowrank(centered, q=q, center=False)
            finally:
                torch.random.set_rng_state(generator_state)
            components = v[:, :q]
        else:
            components = torch.eye(x.shape[1])
        return cls(mean, components, kmeans(centered @ components, min(clusters, len(x)), seed=seed))

    def to(self, device) -> Router:
        return Router(self.mean.to(device), self.components.to(device), self.centroids.to(device))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist((x.float() - self.mean) @ self.components, self.centroids).argmin(dim=1)

    @property
    def flops(self) -> int:
        d, c = self.components.shape
        return 2 * d * c + 3 * len(self.centroids) * c


def _weight_out_in(projection: nn.Module) -> torch.Tensor:
    out_axis, _ = feature_axes(projection)
    return projection.weight.detach().float() if out_axis == 0 else projection.weight.detach().float().T


class ExpandedFFNs(Sparsified):
    """Sparse Expansion's handle: sparsity is the weight sparsity of the copies tokens ran."""

    def __init__(self, model: nn.Module, sites: list[FFNSite]):
        super().__init__("sparse_expansion", model, sites)
        self._zeros = torch.zeros(len(self.sites), dtype=torch.float64)  # token-weighted zero fraction, summed
        self._tokens = torch.zeros(len(self.sites), dtype=torch.float64)

    def reset(self) -> None:
        super().reset()
        self._zeros.zero_()
        self._tokens.zero_()

    def record(self, layer: int, zero_fraction: torch.Tensor, share: float) -> None:
        """``zero_fraction``: per scored token, the zero fraction of the copy it ran, for a matrix
        holding ``share`` of the FFN's weights (the layer's figure is the weighted mean)."""
        self._zeros[layer] += float(zero_fraction.sum()) * share
        self._tokens[layer] += zero_fraction.numel() * share

    def per_layer_sparsity(self) -> list[float]:
        return [float(self._zeros[i] / self._tokens[i]) if self._tokens[i] else 0.0 for i in range(len(self.sites))]

    def ffn_flops_per_token(self) -> float:
        return self.router_flops + sum(
            site.unit_flops * site.matrices * (1 - s)
            for site, s in zip(self.sites, self.per_layer_sparsity(), strict=True)
        )


def _install(
    handle: ExpandedFFNs,
    site: FFNSite,
    projection: nn.Module,
    router: Router,
    experts: torch.Tensor,
    zero_fraction: torch.Tensor,
) -> None:
    """Replace ``projection``'s output: each token through the pruned copy of its cluster."""
    bias = getattr(projection, "bias", None)
    share = experts[0].numel() / (site.d_model * site.width * site.matrices)  # of the FFN's weights

    def forward_hook(module, args, output):
        if not handle.enabled:
            return None
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        labels = router.assign(flat)
        out = torch.empty(flat.shape[0], experts.shape[1], dtype=output.dtype, device=output.device)
        for k in labels.unique().tolist():
            rows = labels == k
            out[rows] = (flat[rows].to(experts.dtype) @ experts[k].T).to(output.dtype)
        if bias is not None:
            out = out + bias
        handle.record(
            site.index, handle.as_tokens(zero_fraction[labels].reshape(*x.shape[:-1], 1))[:, handle.prefix :], share
        )
        return out.reshape(*output.shape)

    handle.hook(projection.register_forward_hook(forward_hook))


def _expand(
    x: torch.Tensor, projection: nn.Module, router: Router, labels: torch.Tensor, clusters: int, sparsity: float, n_m
) -> tuple[torch.Tensor, torch.Tensor]:
    """K pruned copies [K, out, in] of ``projection`` and the zero fraction of each."""
    weight = _weight_out_in(projection)
    copies, zeros = [], []
    for k in range(len(router.centroids)):
        members = x[labels == k]
        if len(members) == 0:  # an empty cluster (no calibration token nearest to it): the layer's whole Hessian
            members = x
        pruned = prune(weight, members.T @ members, sparsity, n_m)
        copies.append(pruned)
        zeros.append(float((pruned == 0).float().mean()))
    return torch.stack(copies), torch.tensor(zeros)


def apply(
    model: nn.Module,
    target_sparsity: float,
    calibration,
    clusters: int = 16,
    pca_factor: int = 32,
    n_m: tuple[int, int] | None = None,
    seed: int = 0,
    cache: dict | None = None,
) -> ExpandedFFNs:
    """Expand every FFN of ``model`` (see the module docstring). ``cache`` is unused: the experts
    depend on the target."""
    sites = ffn_sites(model)
    dense_only(sites, "Sparse Expansion")
    handle = ExpandedFFNs(model, sites)
    device = next(model.parameters()).device
    for site in sites:
        x, z = layer_inputs(model, site, calibration, MAX_TOKENS)
        for inputs, projections in ((x, site.first), (z, [site.down])):
            router = Router.fit(inputs, clusters, pca_factor, seed + site.index)
            labels = router.assign(inputs)
            handle.router_flops += router.flops
            for projection in projections:
                experts, zero_fraction = _expand(inputs, projection, router, labels, clusters, target_sparsity, n_m)
                _install(
                    handle,
                    site,
                    projection,
                    router.to(device),
                    experts.to(device, projection.weight.dtype),
                    zero_fraction.to(device),
                )
    handle.reset()  # calibration forwards ran through the hooks already installed
    return handle
