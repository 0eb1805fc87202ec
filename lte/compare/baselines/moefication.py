"""MoEfication (Zhang et al. 2022, thunlp/MoEfication): experts from balanced k-means, top-k routing.

Per FFN, the neurons are grouped into equal-size experts by the same balanced k-means on
normalised gate rows that LTE uses (:func:`lte.model.grouping.balanced_kmeans`; the weights are not
permuted: the grouping is a neuron -> expert label). Each FFN gets MoEfication's MLP router
(``Linear(d, E) -> tanh -> Linear(E, E)``, the first layer initialised to the experts' normalised
centroids, the second to the identity), trained on calibration tokens to predict each expert's
activation norm: the L2 norm of the expert's down-projection inputs over the token's largest such
norm, by binary cross-entropy on those soft targets. (MoEfication's ``MLPCenter`` targets the sum
of an expert's ReLU outputs over the batch maximum; gated FFNs have no ReLU, so the norm of the
neurons that actually reach the down projection stands in for it.) Each token then runs the
``round(E * (1 - s))`` experts with the highest predicted norm. The routers' FLOPs are counted.
"""

from __future__ import annotations

import torch
from torch import nn

from ...model.grouping import balanced_kmeans, neuron_rows
from .sites import Sparsified, cached, collect, dense_only, ffn_sites

ROUTER_STEPS = 300
ROUTER_TOKENS = 8192  # calibration tokens a router is fitted on (the same ones for its inputs and targets)


class MLPRouter(nn.Module):
    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        experts, d_model = centroids.shape
        self.inner = nn.Linear(d_model, experts)
        self.outer = nn.Linear(experts, experts)
        with torch.no_grad():
            self.inner.weight.copy_(nn.functional.normalize(centroids, dim=1))
            self.inner.bias.zero_()
            self.outer.weight.copy_(torch.eye(experts))
            self.outer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x)))


def fit_router(
    router: MLPRouter, x: torch.Tensor, norms: torch.Tensor, steps: int = ROUTER_STEPS, lr: float = 1e-2
) -> None:
    target = norms / norms.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    with torch.enable_grad():  # callers may be evaluating under no_grad
        for _ in range(steps):
            loss = nn.functional.binary_cross_entropy_with_logits(router(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def fit(model: nn.Module, calibration, expert_size: int = 32, seed: int = 0) -> list[tuple[MLPRouter, torch.Tensor]]:
    """Per FFN: (router, neuron -> expert labels), fitted on the calibration data."""
    sites = ffn_sites(model)
    dense_only(sites, "MoEfication")
    for site in sites:
        if site.width % expert_size:
            raise ValueError(f"expert_size={expert_size} does not divide the FFN width {site.width}")
    labels = [
        balanced_kmeans(
            neuron_rows(site.host, site.spec).float().cpu(), site.width // expert_size, seed=seed + site.index
        )
        for site in sites
    ]

    def expert_norms(site, z):
        label = labels[site.index].to(z.device)
        return (
            torch.zeros(z.shape[0], site.width // expert_size, device=z.device).index_add_(1, label, z.square()).sqrt()
        )

    with torch.no_grad():
        data = collect(model, calibration, {"input": None, "z": expert_norms}, max_tokens=ROUTER_TOKENS)
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    fitted = []
    try:
        for site in sites:
            rows = nn.functional.normalize(neuron_rows(site.host, site.spec).float().cpu(), dim=1)
            centroids = torch.zeros(site.width // expert_size, site.d_model).index_add_(0, labels[site.index], rows)
            router = MLPRouter(centroids)
            fit_router(router, data["input"][site.index], data["z"][site.index])
            fitted.append((router.to(device).eval().requires_grad_(False), labels[site.index].to(device)))
    finally:
        torch.random.set_rng_state(generator_state)
    return fitted


def apply(
    model: nn.Module,
    target_sparsity: float,
    calibration,
    expert_size: int = 32,
    seed: int = 0,
    cache: dict | None = None,
) -> Sparsified:
    sites = ffn_sites(model)
    routers = cached(cache, f"routers/{expert_size}/{seed}", lambda: fit(model, calibration, expert_size, seed))
    handle = Sparsified("moefication", model, sites)
    for site, (router, label) in zip(sites, routers, strict=True):
        experts = router.outer.out_features
        handle.router_flops += 2 * site.d_model * experts + 2 * experts * experts
        kept = round(experts * (1 - target_sparsity))
        seen: dict[str, torch.Tensor] = {}

        def remember(module, args, seen=seen):
            if handle.enabled:
                seen["x"] = args[0]

        def rule(site, z, call, router=router, kept=kept, seen=seen, label=label):
            with torch.no_grad():
                scores = router(seen.pop("x").float())
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            if kept > 0:
                chosen.scatter_(-1, scores.topk(kept, dim=-1).indices, True)
            return chosen[..., label]

        handle.hook(site.first[0].register_forward_pre_hook(remember))
        handle.mask_neurons(site, rule)
    return handle
