"""LTE inside the routed experts of a mixture-of-experts layer: one mechanism for every family.

transformers 5 stores an MoE layer's routed experts as 3-D tensors in one module per layer
(``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``...) and describes their layout through
``use_experts_implementation`` flags: gated or up-only, ``[gate; up]`` concatenated or interleaved,
``(E, 2I, H)`` or transposed ``(E, H, 2I)``, with or without biases. Those flags plus the tensor
shapes are all this module reads (:func:`experts_layout`); nothing here is per family.

* **Groups**: each expert's ``I`` neurons are clustered into ``I / expert_size`` contiguous groups
  (balanced k-means on the expert's gate rows, :mod:`lte.model.grouping`), per expert. The
  clustering reads weights only, so an expert that receives no calibration token is grouped like
  the others; its router rows start at its group centroids (the rule for unseen experts).
* **Router**: one tensor per layer, ``[E, G, H]`` (G groups per expert), i.e. one router per
  (layer, expert) stored together; each token scores only the groups of the experts the model's
  own router sent it to (``k * G`` scores, not ``E * G``). The two choices of issue 29 hold the
  same parameters; they differ in what a token computes, and scoring every (expert, group) costs
  ``E / k`` times more router work for scores nobody uses (docs/moe.md has the measurement).
* **Forward**: an ``"lte"`` implementation registered with transformers' ``ExpertsInterface``
  (:data:`IMPLEMENTATION`). It runs each selected expert on the tokens it received and masks (hard)
  or scales (soft) the neurons of each group at the down projection's input, exactly as
  :class:`~lte.model.layers.LTEMLP` does for a dense FFN. The model's own gate function
  (``_apply_gate``: gpt-oss's clamped, interleaved SwiGLU included) and post-expert norm are used.
* **Losses**: the router scores of every (token, selected expert) pair are recorded with the token
  each row belongs to (:class:`~lte.model.layers.RouterRecord` ``tokens``), so the efficiency and
  separability losses and the sparsity run over the tokens each expert actually received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .grouping import balanced_kmeans
from .layers import LTEMLP, RouterRecord, _collector, lte_layers
from .registry import FFNSpec, logical_shape

IMPLEMENTATION = "lte"  # the name registered with transformers' ExpertsInterface
DENSE_IMPLEMENTATION = "grouped_mm"  # what an experts module not (yet) routed by LTE runs


@dataclass(frozen=True)
class ExpertsLayout:
    """The layout facts of one fused experts module (transformers' ``use_experts_implementation`` flags)."""

    up: str  # "gate_up_proj" (gated) or "up_proj"
    down: str
    gated: bool
    transposed: bool  # weights stored (E, in, out) instead of (E, out, in)
    concatenated: bool  # [gate; up] blocks; False: gate and up interleaved per neuron
    bias: bool
    num_experts: int
    width: int  # I, neurons per expert
    d_model: int

    @property
    def spec(self) -> FFNSpec:
        """The host's entry in ``ffn_hosts`` (the tensors' names, as for a dense FFN)."""
        return FFNSpec(first=(self.up,), down=self.down, cluster_on=self.up, fused_chunks=2 if self.gated else 1)

    def up_index(self, order: torch.Tensor) -> torch.Tensor:
        """Positions along the up projection's output of the neurons ``order`` (gate and up of each)."""
        if not self.gated:
            return order
        if self.concatenated:
            return torch.cat([order, order + self.width])
        return torch.stack([2 * order, 2 * order + 1], dim=1).reshape(-1)


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """``module``'s layout when it is a fused experts module LTE can route, else None. The flags come
    from ``use_experts_implementation``; the shapes must agree with them."""
    if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return None
    gated, transposed = bool(module.has_gate), bool(module.is_transposed)
    up = getattr(module, "gate_up_proj" if gated else "up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    up_shape, down_shape = logical_shape(up), logical_shape(down)  # partitioned by ZeRO-3 too
    if len(up_shape) != 3 or len(down_shape) != 3:
        return None
    num_experts = up_shape[0]
    d_model, width = (down_shape[2], down_shape[1]) if transposed else (down_shape[1], down_shape[2])
    expected_up = (num_experts, d_model, (2 if gated else 1) * width)
    if not transposed:
        expected_up = (num_experts, expected_up[2], d_model)
    if up_shape != expected_up or down_shape[0] != num_experts:
        return None
    return ExpertsLayout(
        up="gate_up_proj" if gated else "up_proj",
        down="down_proj",
        gated=gated,
        transposed=transposed,
        concatenated=bool(getattr(module, "is_concatenated", True)),
        bias=bool(getattr(module, "has_bias", False)),
        num_experts=num_experts,
        width=width,
        d_model=d_model,
    )


def experts_hosts(model: nn.Module) -> dict[str, ExpertsLayout]:
    """Every fused experts module of ``model`` LTE can route, by path (module tree only: works on meta)."""
    return {name: layout for name, module in model.named_modules() if (layout := experts_layout(module)) is not None}


def _weights(module: nn.Module, layout: ExpertsLayout):
    up, down = getattr(module, layout.up), getattr(module, layout.down)
    up_bias = getattr(module, f"{layout.up}_bias", None) if layout.bias else None
    down_bias = getattr(module, f"{layout.down}_bias", None) if layout.bias else None
    return up, down, up_bias, down_bias


def gate_rows(module: nn.Module, layout: ExpertsLayout, expert: int) -> torch.Tensor:
    """[I, H]: the weight rows that describe expert ``expert``'s neurons (its gate, when gated)."""
    up = getattr(module, layout.up)[expert].detach()
    rows = up.t() if layout.transposed else up  # [out, H]
    if not layout.gated:
        return rows
    return rows[: layout.width] if layout.concatenated else rows[0::2]


@torch.no_grad()
def permute_expert_neurons(module: nn.Module, layout: ExpertsLayout, expert: int, order: torch.Tensor) -> None:
    """Reorder one expert's neurons in place (new neuron ``i`` is old ``order[i]``): the function is unchanged."""
    up, down, up_bias, _ = _weights(module, layout)
    index = layout.up_index(order).to(up.device)
    out_axis = 1 if layout.transposed else 0  # in up[expert]
    up[expert].copy_(up[expert].index_select(out_axis, index))
    if up_bias is not None:
        up_bias[expert].copy_(up_bias[expert].index_select(0, index))
    in_axis = 0 if layout.transposed else 1  # in down[expert]
    down[expert].copy_(down[expert].index_select(in_axis, order.to(down.device)))


def group_experts(module: nn.Module, layout: ExpertsLayout, expert_size: int, iters: int = 10, seed: int = 0):
    """Cluster every expert's neurons into contiguous groups of ``expert_size`` (balanced k-means on its
    gate rows) and permute them so. Returns the per-expert permutations."""
    orders = []
    for expert in range(layout.num_experts):
        rows = gate_rows(module, layout, expert)
        labels = balanced_kmeans(rows, layout.width // expert_size, iters=iters, seed=seed * 1009 + expert)
        order = torch.argsort(labels, stable=True)
        permute_expert_neurons(module, layout, expert, order)
        orders.append(order)
    return orders


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


class ExpertsRouter(nn.Module):
    """The LTE routers of one MoE layer: ``weight`` [E, G, H] (and ``bias`` [E, G]); expert ``e``'s
    groups are scored by ``sigmoid(x @ weight[e].T + bias[e])``. Not an ``nn.Linear`` (PEFT's
    ``all-linear`` must not adapt it)."""

    def __init__(self, num_experts: int, groups: int, d_model: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, groups, d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_experts, groups, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(-1, d_model), a=5**0.5)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert], None if self.bias is None else self.bias[expert])


class LTEExperts(LTEMLP):
    """Wraps one fused experts module (kept as ``base_layer``); routings as :class:`LTEMLP`'s.

    ``num_experts`` is the number of LTE groups per routed expert (what a router scores), so
    the code that reads records, thresholds and sparsity treats both kinds of layer alike."""

    routes_experts = True

    def __init__(
        self,
        base_layer: nn.Module,
        spec: FFNSpec,
        expert_size: int,
        layer_index: int,
        threshold: float = 0.5,
        router_bias: bool = False,
        detach_router_input: bool = False,
    ):
        nn.Module.__init__(self)
        layout = experts_layout(base_layer)
        if layout is None:
            raise TypeError(f"{type(base_layer).__name__} is no fused experts module")
        self.base_layer = base_layer
        self.layout = layout
        self.spec = spec
        self.expert_size = expert_size
        self.num_experts = layout.width // expert_size
        self.layer_index = layer_index
        self.trained_threshold = threshold
        self.threshold = threshold
        self.routing = "dense"
        self.detach_router_input = detach_router_input
        weight = getattr(base_layer, layout.up)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lte_router = ExpertsRouter(
            layout.num_experts, self.num_experts, layout.d_model, router_bias, device=weight.device, dtype=dtype
        )
        self._hooks = []
        self.attach_hooks()

    def attach_hooks(self) -> None:
        """The experts module finds its wrapper here (not a submodule: no cycle in the module tree)."""
        self.base_layer.__dict__["_lte"] = self

    @torch.no_grad()
    def init_router_from_experts(self, scale: float = 1.0) -> None:
        """Each expert's router rows := its groups' mean gate rows (an expert's centroids need no tokens)."""
        for expert in range(self.layout.num_experts):
            rows = gate_rows(self.base_layer, self.layout, expert).float()
            self.lte_router.weight[expert].copy_(scale * rows.reshape(self.num_experts, self.expert_size, -1).mean(1))
            if self.lte_router.bias is not None:
                bias = getattr(self.base_layer, f"{self.layout.up}_bias", None) if self.layout.bias else None
                if bias is None:
                    self.lte_router.bias[expert].zero_()
                else:
                    index = self.layout.up_index(torch.arange(self.layout.width))[: self.layout.width]
                    values = bias[expert].index_select(0, index.to(bias.device)).float()
                    self.lte_router.bias[expert].copy_(scale * values.reshape(self.num_experts, -1).mean(1))

    def route(self, expert: int, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate expert ``expert``'s neurons ``h`` [n, I] for its tokens ``x`` [n, H]; returns (h, scores)."""
        x = x.detach() if self.detach_router_input else x
        scores = torch.sigmoid(self.lte_router(x.to(self.lte_router.weight.dtype), expert))
        gate = scores if self.routing == "soft" else (scores > self.threshold).to(scores.dtype)
        h = (h.reshape(h.shape[0], self.num_experts, self.expert_size) * gate.to(h.dtype).unsqueeze(-1)).reshape(
            h.shape
        )
        return h, scores

    def record(self, scores: torch.Tensor, tokens: torch.Tensor) -> None:
        records = _collector.get()
        if records is not None:
            records.append(RouterRecord(self.layer_index, scores, self.trained_threshold, self.threshold, tokens))

    def unwrap(self) -> nn.Module:
        self.base_layer.__dict__.pop("_lte", None)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"routed_experts={self.layout.num_experts}, groups={self.num_experts}, " + super().extra_repr()


def run_experts(self, layout: ExpertsLayout, hidden_states, top_k_index, top_k_weights, gate=None):
    """The experts module ``self``'s output computed expert by expert on the tokens each received, with
    ``gate(expert, x, h) -> (h, scores)`` applied to each expert's neurons ``h`` [n, I] before its down
    projection (None: every neuron). Returns (output, [scores per expert], [their tokens])."""
    up, down, up_bias, down_bias = _weights(self, layout)
    k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(k)
    order = torch.argsort(experts, stable=True)  # expert-parallel sentinels (>= E) sort last and are skipped
    counts = torch.bincount(experts[experts < layout.num_experts], minlength=layout.num_experts).tolist()
    out = torch.zeros_like(hidden_states)
    scores, owners = [], []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        token = tokens[pairs]
        x = hidden_states[token].to(up.dtype)  # QLoRA: fp32 activations (upcast norms), experts as loaded
        proj = _linear(x, up[expert], None if up_bias is None else up_bias[expert], layout.transposed)
        h = self._apply_gate(proj) if layout.gated else self.act_fn(proj)
        if gate is not None:
            h, expert_scores = gate(expert, x, h)
            scores.append(expert_scores)
            owners.append(token)
        y = _linear(h, down[expert], None if down_bias is None else down_bias[expert], layout.transposed)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * weights[pairs, None]).to(out.dtype))
    return out, scores, owners


def lte_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The ``"lte"`` experts implementation: each selected expert runs on the tokens it received, its
    neuron groups gated by its LTE router (masked path: every neuron is computed, the skipped ones are
    zeroed). An experts module without LTE (or with dense routing) runs transformers' grouped one.
    The gate is whatever the module holds as ``_lte`` with ``routing``, ``layout``, ``route`` and
    ``record``: an :class:`LTEExperts`, or a compared method's keep-rule (:mod:`lte.compare.baselines`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    lte: LTEExperts | None = self.__dict__.get("_lte")
    if lte is None or lte.routing == "dense":  # grouped_mm casts to the experts' dtype and back itself
        return ALL_EXPERTS_FUNCTIONS[DENSE_IMPLEMENTATION](self, hidden_states, top_k_index, top_k_weights)
    out, scores, owners = run_experts(self, lte.layout, hidden_states, top_k_index, top_k_weights, lte.route)
    if scores:
        lte.record(torch.cat(scores), torch.cat(owners))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return float((a.float() - b.float()).norm()) <= tolerance * float(b.float().norm().clamp_min(1e-12))


@torch.no_grad()
def prove_experts(model: nn.Module, inputs: dict, logits: torch.Tensor, group: int, tolerance: float):
    """``{path: FFNSpec}`` of every fused experts module, proven on one forward as dense FFNs are:
    (1) recomputing each module expert by expert from the layout facts gives the module's own output
    (the layout is read right); (2) masking one neuron group of one expert changes it; (3) permuting the
    neurons within every expert leaves the model's logits unchanged. ``inputs``/``logits``: the trace's."""
    from ..core.errors import UsageError

    hosts = experts_hosts(model)
    if not hosts:
        return {}
    calls = {}
    handles = [
        model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, path=path: calls.setdefault(path, args), with_kwargs=False
        )
        for path in hosts
    ]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for path, layout in hosts.items():
        module, call = model.get_submodule(path), calls.get(path)
        where = f"{path} ({type(module).__name__})"
        if call is None:
            raise UsageError(f"the experts module {where} is never called by a forward; LTE cannot route it")
        own = module(*call)
        mine = run_experts(module, layout, *call)[0]
        if not _close(mine, own, tolerance):
            raise UsageError(
                f"recomputing {where} expert by expert from its layout ({layout}) does not give its output; "
                f"LTE cannot route these experts"
            )
        hit = int(call[1].reshape(-1).min())
        size = min(group, layout.width)

        def mask(expert, x, h, hit=hit, size=size):
            if expert == hit:
                h = h.clone()
                h[:, :size] = 0
            return h, h.new_zeros(h.shape[0], 1)

        if _close(run_experts(module, layout, *call, gate=mask)[0], mine, 0.0):
            raise UsageError(f"masking neurons of expert {hit} of {where} does not change its output")
    generator = torch.Generator().manual_seed(0)
    orders = {
        path: [torch.randperm(layout.width, generator=generator) for _ in range(layout.num_experts)]
        for path, layout in hosts.items()
    }
    for path, layout in hosts.items():
        for expert, order in enumerate(orders[path]):
            permute_expert_neurons(model.get_submodule(path), layout, expert, order)
    try:
        out = model(**inputs)
        permuted = (out.logits if hasattr(out, "logits") else out[0]).float()
    finally:
        for path, layout in hosts.items():
            for expert, order in enumerate(orders[path]):
                permute_expert_neurons(model.get_submodule(path), layout, expert, torch.argsort(order))
    if not _close(permuted, logits, tolerance):
        raise UsageError(
            f"permuting the neurons within each expert changes {type(model).__name__}'s logits, so the experts "
            f"layout is misread for {sorted({type(model.get_submodule(p)).__name__ for p in hosts})}"
        )
    return {path: layout.spec for path, layout in hosts.items()}


def register() -> None:
    """Register :func:`lte_experts_forward` as ``"lte"`` with transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, lte_experts_forward)


def use_lte_experts(model: nn.Module) -> None:
    """Make every experts module of ``model`` dispatch to the ``"lte"`` implementation, remembering the one it
    had (:func:`restore_experts_implementation`)."""
    register()
    if hasattr(model, "set_experts_implementation"):
        current = getattr(model.config, "_experts_implementation", None)
        if current != IMPLEMENTATION:  # every sub-model's, where transformers can say (multimodal models)
            getter = getattr(model, "get_experts_implementation", None)
            model.__dict__["_lte_previous_experts"] = getter() if getter is not None else current
        model.set_experts_implementation(IMPLEMENTATION)


def restore_experts_implementation(model: nn.Module) -> None:
    """Give ``model`` back the experts implementation it had before :func:`use_lte_experts` (``unload_lte``)."""
    previous = model.__dict__.pop("_lte_previous_experts", None)
    if isinstance(previous, dict):  # sub-models without an implementation of their own keep the default
        previous = {key: value for key, value in previous.items() if value is not None} or None
    if previous is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(previous)


def moe_router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's own MoE routers: in each module that holds an experts module, the sibling parameters
    whose first axis counts the experts (``gate.weight`` [E, H], ``router.bias`` [E]...). Never an LTE
    layer's (a shared expert's router or weights can have E rows too)."""
    found = []
    lte = {id(p) for layer in lte_layers(model) for p in layer.parameters()}
    for path, layout in experts_hosts(model).items():
        parent_path, _, child = path.removesuffix(".base_layer").rpartition(".")
        parent = model.get_submodule(parent_path)
        for name, param in parent.named_parameters():
            if name.startswith(child + ".") or id(param) in lte:  # the experts' own tensors, LTE's layers
                continue
            shape = logical_shape(param)  # partitioned by ZeRO-3 too
            if 1 <= len(shape) <= 2 and shape[0] == layout.num_experts:
                found.append((f"{parent_path}.{name}", param))
    return found


@torch.no_grad()
def top_k_choices(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per experts module: the model's own top-k expert choices [tokens, k] on ``batches`` (real tokens)."""
    chosen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for found in experts_hosts(model):
        path = found.replace(".base_layer", "")  # the same key before and after LTE wraps the module

        def take(module, args, kwargs, path=path):
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            chosen.setdefault(path, []).append(index.detach().sort(dim=-1).values.cpu())

        handles.append(model.get_submodule(found).register_forward_pre_hook(take, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return {path: torch.cat(values) for path, values in chosen.items()}


def top_k_agreement(original: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer: the mean share of a token's top-k experts that ``other`` chose as ``original`` did."""
    out = {}
    for path, a in original.items():
        b = other[path]
        same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean()
        out[path] = float(same)
    return out
