"""What every baseline method hooks: each FFN's input, activation and down-projection input.

The FFN registry of :mod:`lte.model.registry` gives, per architecture, the projections that produce
the intermediate neurons and the one that consumes them. A method sparsifies by returning a
keep-mask over the down projection's input ``Z`` (one entry per token and neuron) and, for TEAL,
by zeroing entries of the FFN input. :class:`Sparsified` installs those hooks, counts what was
kept over the scored positions, and removes everything again, leaving the model as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...model.layers import threshold_skipping
from ...model.registry import FFNSpec, feature_axes, layout_from_list, layout_to_list, weight_shape

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


@dataclass
class FFNSite:
    """One FFN: its host module, its projections, and its activation module."""

    index: int
    name: str
    host: nn.Module
    spec: FFNSpec
    first: list[nn.Module]
    down: nn.Module
    act: nn.Module | None
    d_model: int
    width: int

    @property
    def gated(self) -> bool:
        return len(self.spec.first) > 1 or self.spec.fused_chunks > 1

    @property
    def matrices(self) -> int:
        """d_model x width weight matrices per FFN: gate, up, down (gated) or in, out."""
        return 3 if self.gated else 2

    @property
    def unit_flops(self) -> int:
        """FLOPs of one d_model x width matrix-vector product (multiply + add)."""
        return 2 * self.d_model * self.width


def activation_module(host: nn.Module) -> nn.Module | None:
    """The FFN's activation module (SiLU, GELU, ReLU...), called once per forward on the gate."""
    for module in host.children():
        if type(module).__module__ in _ACTIVATION_MODULES:
            return module
    return None


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every FFN of ``model`` in depth order."""
    from ...model.detect import detect_layout
    from ...model.layers import LTEMLP

    wrapped = [(name, m.base_layer, m.spec) for name, m in model.named_modules() if isinstance(m, LTEMLP)]
    if not wrapped and not getattr(model, "lte_ffn_hosts", None):
        # detected once, before any method's hooks change the forward; or an LTE run's saved layout (lte compare)
        model.lte_ffn_hosts = layout_to_list(detect_layout(model))
    found = wrapped or [
        (name, model.get_submodule(name), spec) for name, spec in layout_from_list(model.lte_ffn_hosts).items()
    ]
    sites = []
    for name, host, spec in found:
        down = host.get_submodule(spec.down)
        first = [host.get_submodule(n) for n in spec.first]
        d_model = weight_shape(first[0])[feature_axes(first[0])[1]]
        width = weight_shape(down)[feature_axes(down)[1]]
        sites.append(FFNSite(len(sites), name, host, spec, first, down, activation_module(host), d_model, width))
    return sites


def cached(cache: dict | None, key: str, compute):
    """``compute()``, or its value from an earlier call with the same ``cache`` (what a method
    measures on the calibration data does not depend on the target sparsity)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def quantile(values: torch.Tensor, q: float, max_values: int = 1 << 24) -> float:
    """The ``q`` quantile of ``values`` (an evenly strided subsample above ``max_values``)."""
    flat = values.reshape(-1).float()
    if flat.numel() > max_values:
        flat = flat[:: -(-flat.numel() // max_values)]
    if q <= 0:
        return float("-inf")
    k = min(max(1, round(q * flat.numel())), flat.numel())
    return threshold_skipping(flat, k)


class Sparsified:
    """Hooks a method installed on a model. ``remove()`` restores the model exactly.

    ``prefix``: positions before it are the prompt (GRIFFIN keeps them dense); statistics are
    counted over the other positions, the ones whose predictions the harness scores.
    """

    def __init__(self, name: str, model: nn.Module, sites: list[FFNSite] | None = None):
        self.name = name
        self.sites = ffn_sites(model) if sites is None else sites
        self.prefix = 0
        self.reads_prompt = False  # GRIFFIN: the harness must set ``prefix`` for each sequence
        self.enabled = True
        self._handles: list = []
        self._batch_shape: tuple[int, int] | None = None  # (batch, sequence) of the running forward
        self.hook(model.register_forward_pre_hook(self._remember_shape, with_kwargs=True))
        self._kept = torch.zeros(len(self.sites), dtype=torch.float64)
        self._input_kept = torch.zeros(len(self.sites), dtype=torch.float64)
        self._count = torch.zeros(len(self.sites), dtype=torch.float64)
        self._input_count = torch.zeros(len(self.sites), dtype=torch.float64)
        self.router_flops = 0.0  # per token, all layers (predictors, routers)
        self.gate_dense = False  # CATS computes the whole gate to decide

    def hook(self, handle) -> None:
        self._handles.append(handle)

    def _remember_shape(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._batch_shape = tuple(ids.shape[:2])

    def as_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as [batch, sequence, features]: some models (OPT) run the FFN on flattened tokens."""
        return t if t.dim() == 3 else t.reshape(*self._batch_shape, t.shape[-1])

    def mask_neurons(self, site: FFNSite, rule) -> None:
        """Zero the down projection's input where ``rule(site, z) -> keep`` (bool, z's shape) is False."""

        def pre_hook(module, args):
            if not self.enabled:
                return None
            z = args[0]
            keep = rule(site, self.as_tokens(z))
            self.count(site.index, keep)
            return (z * keep.reshape(z.shape).to(z.dtype), *args[1:])

        self.hook(site.down.register_forward_pre_hook(pre_hook))

    def _scored(self, mask: torch.Tensor) -> torch.Tensor:
        return self.as_tokens(mask)[:, self.prefix :]

    def count(self, layer: int, keep: torch.Tensor) -> None:
        scored = self._scored(keep)
        self._kept[layer] += float(scored.float().mean(dim=-1).sum())
        self._count[layer] += scored.shape[:-1].numel()

    def count_input(self, layer: int, keep: torch.Tensor) -> None:
        scored = self._scored(keep)
        self._input_kept[layer] += float(scored.float().mean(dim=-1).sum())
        self._input_count[layer] += scored.shape[:-1].numel()

    def reset(self) -> None:
        for t in (self._kept, self._input_kept, self._count, self._input_count):
            t.zero_()

    @contextlib.contextmanager
    def disabled(self):
        """Run the model dense inside this block (the reference logits)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _keep(self, layer: int) -> float:
        """Fraction of layer's neurons kept per scored token (1 when nothing was masked: dense)."""
        count = float(self._count[layer])
        return float(self._kept[layer]) / count if count else 1.0

    def per_layer_sparsity(self) -> list[float]:
        """Fraction of FFN neurons (down-projection inputs) zeroed per token, per layer."""
        return [1 - self._keep(site.index) for site in self.sites]

    def per_layer_input_sparsity(self) -> list[float]:
        """TEAL: fraction of FFN input entries zeroed per token, per layer (0 for other methods)."""
        return [
            1 - float(self._input_kept[i] / self._input_count[i]) if self._input_count[i] else 0.0
            for i in range(len(self.sites))
        ]

    def ffn_flops_per_token(self) -> float:
        """FFN FLOPs per scored token, all layers, including routers and predictors."""
        total = self.router_flops
        for site in self.sites:
            keep = self._keep(site.index)
            if self._input_count[site.index] > 0:  # TEAL: sparse inputs skip weight columns of every row
                keep_in = float(self._input_kept[site.index] / self._input_count[site.index])
                total += site.unit_flops * ((site.matrices - 1) * keep_in + keep)
            elif self.gate_dense:  # CATS: the gate is computed for every neuron
                total += site.unit_flops * (1 + (site.matrices - 1) * keep)
            else:  # whole neurons skipped: their rows of gate/up and column of down
                total += site.unit_flops * site.matrices * keep
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def run_batches(model: nn.Module, batches, hooks: list, progress: str | None = None) -> None:
    """Forward ``batches`` through ``model`` (inputs only), then remove ``hooks``, which recorded
    what the caller wanted (a progress bar only with ``progress``)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc=progress, leave=False, disable=progress is None):
            model(input_ids=batch["input_ids"].to(device))
    finally:
        for hook in hooks:
            hook.remove()


def dense_ffn_flops_per_token(sites: list[FFNSite]) -> float:
    return float(sum(site.unit_flops * site.matrices for site in sites))


@torch.no_grad()
def collect(
    model: nn.Module,
    batches,
    taps: dict[str, object],
    max_values: int = 1 << 22,
    max_tokens: int | None = None,
    sites: list[FFNSite] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Run the dense model on ``batches`` and keep, per tap and per FFN, a [tokens, features]
    float tensor on the CPU. Taps: "input" (the FFN input), "act" (the activation output), "z"
    (the down projection's input); the value is a function applied to the flattened tensor first
    (None keeps it). At most about ``max_values`` numbers are kept per tap and FFN: tokens are
    taken at an even stride, which is plenty for quantiles and keeps 7B-sized FFNs in memory.
    ``max_tokens`` instead keeps the same tokens for every tap (rows stay aligned across taps).
    ``sites``: only these FFNs (default all); the lists follow their order."""
    sites = ffn_sites(model) if sites is None else sites
    out: dict[str, list[list[torch.Tensor]]] = {tap: [[] for _ in sites] for tap in taps}
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    handles = []
    for slot, site in enumerate(sites):
        for tap, transform in taps.items():

            def grab(module, args, output=None, site=site, slot=slot, tap=tap, transform=transform):
                value = output if tap == "act" else args[0]
                value = value.detach().reshape(-1, value.shape[-1]).float()
                if transform is not None:
                    value = transform(site, value)
                budget = max_tokens if max_tokens is not None else max(1, max_values // value.shape[-1])
                stride = max(1, -(-tokens // budget))
                out[tap][slot].append(value[::stride].cpu())

            if tap == "input":
                handles.append(site.first[0].register_forward_pre_hook(grab))
            elif tap == "z":
                handles.append(site.down.register_forward_pre_hook(grab))
            elif tap == "act":
                if site.act is None:
                    raise ValueError(f"{type(site.host).__name__} has no activation module to tap")
                handles.append(site.act.register_forward_hook(grab))
            else:
                raise ValueError(f"unknown tap {tap!r}")
    run_batches(model, batches, handles)
    return {tap: [torch.cat(chunks) for chunks in per_site] for tap, per_site in out.items()}


def layer_inputs(
    model: nn.Module, site: FFNSite, calibration, max_tokens: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FFN's inputs and down-projection inputs on the calibration data, as the model now runs
    (with whatever sparsity is already installed in the layers before it): [tokens, features]
    each, the same tokens for both, at most about ``max_tokens`` of them."""
    out = collect(model, calibration, {"input": None, "z": None}, max_tokens=max_tokens, sites=[site])
    return out["input"][0], out["z"][0]
