"""What every baseline method hooks: each FFN's input, activation and down-projection input.

The FFN registry of :mod:`lte.model.registry` gives, per architecture, the projections that produce
the intermediate neurons and the one that consumes them. A method sparsifies by returning a
keep-mask over the down projection's input ``Z`` (one entry per token and neuron) and, for TEAL,
by zeroing entries of the FFN input. :class:`Sparsified` installs those hooks, counts what was
kept over the scored positions, and removes everything again, leaving the model as it was.

The routed experts of a mixture-of-experts layer are sites too (``site.experts``): one module runs
every expert on the tokens the model's own router sent it, so the keep-mask is applied per (token,
selected expert) pair, inside transformers' ``"lte"`` experts implementation
(:mod:`lte.model.experts`), and counted over those pairs: "sparsity inside the selected experts".
A rule then also gets ``call = (expert, x)``, the expert and its tokens' inputs (None for a dense FFN).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...model.experts import ExpertsLayout, experts_layout, gate_rows, restore_experts_implementation, use_lte_experts
from ...model.layers import threshold_skipping
from ...model.registry import FFNSpec, feature_axes, layout_from_list, layout_to_list, weight_shape

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


@dataclass
class FFNSite:
    """One FFN: its host module, its projections, and its activation module. For routed experts
    (``experts`` set), the experts module, no projection modules, ``width`` per expert, and
    ``top_k`` experts run per token."""

    index: int
    name: str
    host: nn.Module
    spec: FFNSpec
    first: list[nn.Module]
    down: nn.Module | None
    act: nn.Module | None
    d_model: int
    width: int
    experts: ExpertsLayout | None = None
    top_k: int = 1

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


def _top_k(model: nn.Module, path: str) -> int:
    """Experts per token of the MoE block holding the experts module at ``path``: its router's
    ``top_k`` (transformers 5's routers), else the config's ``num_experts_per_tok``."""
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    for module in parent.modules():
        for name in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(module, name, None), int):
                return getattr(module, name)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if isinstance(getattr(config, "num_experts_per_tok", None), int):
        return config.num_experts_per_tok
    raise ValueError(f"cannot tell how many experts per token the MoE block at {path} runs (no top_k)")


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every FFN of ``model`` in depth order (routed experts modules included)."""
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
        if (layout := experts_layout(host)) is not None:
            act, top_k = getattr(host, "act_fn", None), _top_k(model, name.removesuffix(".base_layer"))
            d_model, width = layout.d_model, layout.width
            sites.append(FFNSite(len(sites), name, host, spec, [], None, act, d_model, width, layout, top_k))
            continue
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
        self.model = model
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
        """Zero the down projection's input where ``rule(site, z, call) -> keep`` (bool, z's shape) is
        False; for routed experts per (token, selected expert) pair, ``z`` one expert's rows and
        ``call = (expert, x)``."""
        if site.experts is not None:
            self.hook(_NeuronGate(self, site, rule).install(self.model))
            return

        def pre_hook(module, args):
            if not self.enabled:
                return None
            z = args[0]
            keep = rule(site, self.as_tokens(z), None)
            self.count(site.index, keep)
            return (z * keep.reshape(z.shape).to(z.dtype), *args[1:])

        self.hook(site.down.register_forward_pre_hook(pre_hook))

    def _scored(self, mask: torch.Tensor) -> torch.Tensor:
        return self.as_tokens(mask)[:, self.prefix :]

    def count(self, layer: int, keep: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Neurons kept, per token (``keep`` [batch, sequence, neurons] or the flat tokens'), or per
        (token, expert) pair: ``keep`` [pairs, neurons] with each pair's flat token index ``tokens``."""
        scored = self._scored(keep) if tokens is None else keep[tokens % self._batch_shape[1] >= self.prefix]
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
                matrices = (site.matrices - 1) * keep_in + keep
            elif self.gate_dense:  # CATS: the gate is computed for every neuron
                matrices = 1 + (site.matrices - 1) * keep
            else:  # whole neurons skipped: their rows of gate/up and column of down
                matrices = site.matrices * keep
            total += site.top_k * site.unit_flops * matrices  # routed experts: each of the top-k selected
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
    return float(sum(site.top_k * site.unit_flops * site.matrices for site in sites))


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
    ``sites``: only these FFNs (default all); the lists follow their order. Routed experts: "input"
    has a row per token, "act" and "z" a row per (token, selected expert) pair, in the order the
    experts ran, sampled at an even stride over all pairs (not aligned with "input"); the budgets
    count tokens, so up to ``top_k`` times as many pair rows are kept."""
    sites = ffn_sites(model) if sites is None else sites
    out: dict[str, list[list[torch.Tensor]]] = {tap: [[] for _ in sites] for tap in taps}
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    handles = []
    for slot, site in enumerate(sites):
        grabs = {}
        for tap, transform in taps.items():
            if tap not in ("input", "act", "z"):
                raise ValueError(f"unknown tap {tap!r}")
            if tap == "act" and site.act is None:
                raise ValueError(f"{type(site.host).__name__} has no activation module to tap")

            pairs = site.experts is not None and tap != "input"  # a row per (token, selected expert)
            seen = [0]  # pair rows come expert by expert: the stride runs on over the calls

            def grab(value, site=site, slot=slot, tap=tap, transform=transform, pairs=pairs, seen=seen):
                value = value.detach().reshape(-1, value.shape[-1]).float()
                if transform is not None:
                    value = transform(site, value)
                budget = max_tokens if max_tokens is not None else max(1, max_values // value.shape[-1])
                stride = max(1, -(-tokens // budget))  # budgets count tokens (pair taps: their k pairs each)
                start = (-seen[0]) % stride if pairs else 0
                seen[0] += value.shape[0]
                out[tap][slot].append(value[start::stride].cpu())

            grabs[tap] = grab
        if "input" in grabs:  # the FFN's input; for routed experts, every token's, once
            where = site.host if site.experts is not None else site.first[0]
            handles.append(where.register_forward_pre_hook(lambda m, args, grab=grabs["input"]: grab(args[0])))
        if site.experts is not None and ("z" in grabs or "act" in grabs):  # per (token, selected expert) pair

            def record(site, z, call, grabs=grabs):
                if "act" in grabs:
                    grabs["act"](expert_activation(site, call, z))
                if "z" in grabs:
                    grabs["z"](z)
                return torch.ones_like(z, dtype=torch.bool)

            handles.append(_NeuronGate(None, site, record).install(model))
        elif site.experts is None:
            if "z" in grabs:
                handles.append(site.down.register_forward_pre_hook(lambda m, args, grab=grabs["z"]: grab(args[0])))
            if "act" in grabs:
                handles.append(site.act.register_forward_hook(lambda m, args, output, grab=grabs["act"]: grab(output)))
    run_batches(model, batches, handles)
    return {tap: [torch.cat(chunks) for chunks in per_site] for tap, per_site in out.items()}


def layer_inputs(
    model: nn.Module, site: FFNSite, calibration, max_tokens: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FFN's inputs and down-projection inputs on the calibration data, as the model now runs
    (with whatever sparsity is already installed in the layers before it): [tokens, features]
    each, the same tokens for both, at most about ``max_tokens`` of them (routed experts: the
    down-projection inputs per (token, selected expert) pair, see :func:`collect`)."""
    out = collect(model, calibration, {"input": None, "z": None}, max_tokens=max_tokens, sites=[site])
    return out["input"][0], out["z"][0]


class _NeuronGate:
    """A method's keep-rule on one routed experts module, in the place of an LTE layer: transformers'
    ``"lte"`` experts implementation runs each selected expert on its tokens and calls :meth:`route`
    on its neurons, then :meth:`record` with every (token, expert) pair's keep-mask."""

    def __init__(self, handle: Sparsified | None, site: FFNSite, rule):
        self.handle, self.site, self.rule, self.layout = handle, site, rule, site.experts

    @property
    def routing(self) -> str:  # the reference logits: the experts run dense
        return "hard" if self.handle is None or self.handle.enabled else "dense"

    def route(self, expert: int, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.rule(self.site, h, (expert, x))
        return h * keep.to(h.dtype), keep

    def record(self, keep: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.handle is not None:
            self.handle.count(self.site.index, keep, tokens)

    def install(self, model: nn.Module) -> _NeuronGate:
        """Put the gate on its experts module, which then dispatches to the ``"lte"`` implementation;
        ``remove()`` takes it off."""
        if "_lte" in self.site.host.__dict__:
            raise ValueError(f"{self.site.name} is already routed (an LTE layer or another method's rule)")
        use_lte_experts(model)  # remembers the model's own implementation once, while gates are on
        self.site.host.__dict__["_lte"] = self
        self.model = model
        return self

    def remove(self) -> None:
        """Idempotent, as a hook handle's. The last gate off (a calibration pass's gates can come and go
        while a method's stay) gives the model back its own experts implementation."""
        if self.site.host.__dict__.get("_lte") is self:
            del self.site.host.__dict__["_lte"]
        if not any("_lte" in module.__dict__ for module in self.model.modules()):
            restore_experts_implementation(self.model)


def expert_activation(site: FFNSite, call: tuple[int, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """``act(gate(x))`` of one expert's neurons for its tokens ``x`` (CATS decides on it); for an
    up-only expert the down projection's input ``z`` itself."""
    if not site.experts.gated:
        return z
    if site.act is None or site.experts.bias:
        raise ValueError(f"{type(site.host).__name__}: no plain activation of the gate to threshold (CATS)")
    expert, x = call
    rows = gate_rows(site.host, site.experts, expert)
    return site.act(x.to(rows.dtype) @ rows.t())


def dense_only(sites: list[FFNSite], method: str) -> None:
    """A method defined for dense FFNs only refuses a model with routed experts (its row says why)."""
    routed = [site.name for site in sites if site.experts is not None]
    if routed:
        raise ValueError(f"{method} is defined on dense FFNs only; {routed[0]} holds routed experts")
