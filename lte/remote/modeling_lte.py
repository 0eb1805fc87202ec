"""An exported LTE model: the base causal LM whose FFN projections run only routed experts.

The base model (its attention, norms, embeddings, generation code) is untouched: the class
below *is* the base class, and only the FFN projections are swapped for routed ones. The
model's own FFN forward still applies the activation (SwiGLU, GeGLU, GELU...), so one
mechanism serves every family:

* the first projection (gate, or the input projection) owns the layer's sigmoid router and
  decides, per token, which experts run: those with ``sigmoid(router(x)) > threshold``;
* for a single token (batch-1 decoding) the first projections compute only the selected
  experts' rows and hand back a compact activation, and the down projection multiplies it by
  only those experts' weights, stored transposed so each expert's block is contiguous;
* for 2 to 8 tokens with a kernel available, the same over the union of their experts, each
  token's unselected experts zeroed before the down projection;
* for more tokens (prefill, batches) every row is computed and the skipped neurons are zeroed
  before the down projection: the same result at the dense model's speed.

Weights are laid out expert-contiguously: expert ``e`` owns neurons ``e*E .. (e+1)*E-1``
(``E = expert_size``), i.e. rows of the first projections and rows of ``down.weight_t``.
Only torch and transformers are imported. The compact paths use, when present beside this
file (``lte export`` writes them): on CPU the C++ kernel of ``lte_kernels_cpu.py`` (when it
builds), on GPU the Triton kernels of ``lte_kernels_triton.py`` (when triton imports);
otherwise one token runs pure-torch weight slices, one per run of adjacent selected experts.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

import transformers

from .configuration_lte import BASE_ARCHITECTURE, LTEConfig

try:  # the CPU kernel (the project's kernels/cpu.py), written next to this file by `lte export`
    from .lte_kernels_cpu import available as _cpu_kernel_available, expert_matvec, expert_matvec_t
except ImportError:
    _cpu_kernel_available = None


try:  # the GPU kernels (the project's kernels/triton_ffn.py), written next to this file by `lte export`
    from .lte_kernels_triton import (
        available as _triton_available,
        expert_matvec as _triton_matvec,
        expert_matvec_t as _triton_matvec_t,
        select_experts as _triton_select,
    )
except ImportError:
    _triton_available = None


def _use_cpu_kernel(weight: torch.Tensor) -> bool:
    return (_cpu_kernel_available is not None and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and _cpu_kernel_available())


# LTE_FORCE_TRITON=1 runs the Triton path on CPU tensors (under TRITON_INTERPRET=1): how CI tests
# it. Read once here, not in the decode step.
_FORCE_TRITON = os.environ.get("LTE_FORCE_TRITON") == "1"


def _use_triton(device: torch.device) -> bool:
    return (device.type == "cuda" or _FORCE_TRITON) and _triton_available is not None and _triton_available()


# Up to this many tokens, the kernels compute the union of their experts (each weight row is read
# once for all of them); on CPU even a full union is faster than F.linear's small GEMMs where
# measured (`lte bench kernel --batch 4`). More tokens run the masked dense path.
MAX_UNION_TOKENS = 8


class RoutingState:
    """What one FFN layer's router decided for the current forward, shared by its projections.

    ``experts``: the selected experts (int64) when one token is routed (compact path), or the
    union of a few tokens' selections (``token_mask`` [tokens, len(experts)] says whose), else None.
    ``order``/``count``: the same on the GPU path, as device tensors (no host synchronisation):
    every expert ordered selected-first, and how many are selected.
    ``mask``: [..., experts] bool when several tokens are routed (masked path), else None.
    """

    def __init__(self, num_experts: int, expert_size: int):
        self.num_experts = num_experts
        self.expert_size = expert_size
        self.experts = self.token_mask = None
        self.order = self.count = None
        self.mask = None
        self.skipped = None  # experts skipped, summed over tracked tokens
        self.tokens = 0

    def route(self, x, router: nn.Linear, threshold: float, track: bool) -> None:
        scores = torch.sigmoid(router(x.to(router.weight.dtype)))
        on = scores > threshold
        if track:
            off = (~on).sum(dtype=torch.float64)
            self.skipped = off if self.skipped is None else self.skipped + off
            self.tokens += on.shape[:-1].numel()
        tokens = on.shape[:-1].numel()
        self.experts = self.token_mask = self.order = self.count = self.mask = None
        if tokens <= MAX_UNION_TOKENS and _use_triton(on.device):
            self.order, self.count = _triton_select(on)  # the union, on the device
            if tokens > 1:
                self.token_mask = on.reshape(tokens, -1)[:, self.order.long()]  # in slot order
        elif tokens == 1:
            self.experts = on.reshape(-1).nonzero().squeeze(1)
        elif tokens <= MAX_UNION_TOKENS and _use_cpu_kernel(router.weight):
            flat = on.reshape(tokens, -1)
            self.experts = flat.any(dim=0).nonzero().squeeze(1)
            self.token_mask = flat[:, self.experts]
        else:
            self.mask = on

    def segments(self) -> list[tuple[int, int]]:
        """Row ranges of the runs of selected experts, e.g. experts 2, 3, 7 -> [(2E, 4E), (7E, 8E)]."""
        flags = torch.zeros(self.num_experts + 2, dtype=torch.int8)
        flags[self.experts.cpu() + 1] = 1
        edges = torch.diff(flags).nonzero().squeeze(1).tolist()
        size = self.expert_size
        return [(start * size, stop * size) for start, stop in zip(edges[0::2], edges[1::2])]

    def rows(self) -> torch.Tensor:
        """The selected neurons' row indices."""
        offsets = torch.arange(self.expert_size, device=self.experts.device)
        return (self.experts[:, None] * self.expert_size + offsets).reshape(-1)

    def clear(self) -> None:
        self.experts = self.token_mask = self.order = self.count = self.mask = None

    def sparsity(self) -> float | None:
        """Fraction of experts (= of neurons) skipped over the tracked tokens."""
        if not self.tokens:
            return None
        return float(self.skipped) / (self.tokens * self.num_experts)

    def reset_sparsity(self) -> None:
        self.skipped, self.tokens = None, 0


def _as_rows(module: nn.Module, out_is_rows: bool) -> torch.Tensor:
    """``module.weight`` as [out, in] (``out_is_rows``) or [in, out]; Linear and GPT-2's Conv1D."""
    weight = module.weight
    linear_layout = isinstance(module, nn.Linear)  # [out, in]; Conv1D stores [in, out]
    return weight if linear_layout == out_is_rows else weight.t()


class RoutedFirst(nn.Module):
    """A first FFN projection (gate, up, fused gate_up or input): [out, in] rows, optional bias.

    The layer's first-called projection carries ``router`` and routes; the others read the
    shared :class:`RoutingState`. ``chunks`` > 1 is a fused projection (Phi-3's gate_up) that
    stacks ``chunks`` blocks of neurons.
    """

    def __init__(self, base: nn.Module, state: RoutingState, chunks: int = 1, router: nn.Linear | None = None,
                 config: LTEConfig | None = None, layer_index: int = 0):
        super().__init__()
        self.weight = nn.Parameter(_as_rows(base, out_is_rows=True).detach().clone().contiguous(), requires_grad=False)
        bias = getattr(base, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.router = router
        self.chunks = chunks
        self.layer_index = layer_index
        self._state = state
        self._config = config

    def forward(self, x):
        state = self._state
        if self.router is not None:
            config = self._config
            if config.lte_mode == "dense":
                state.clear()
            else:
                state.route(x, self.router, config.lte_thresholds[self.layer_index], config.lte_track_sparsity)
        width = self.weight.shape[0] // self.chunks
        bias = self.bias
        if state.order is not None:  # GPU: every expert's slot, the selected ones first
            size = state.expert_size
            out = torch.cat([_triton_matvec(x, self.weight, state.order, state.count, size, c * width)
                             for c in range(self.chunks)], dim=-1).to(x.dtype)
            if bias is not None:
                slots = state.order.long()
                out = out + torch.cat([bias[c * width:(c + 1) * width].view(-1, size)[slots].reshape(-1)
                                       for c in range(self.chunks)])
            return out.reshape(*x.shape[:-1], -1)
        if state.experts is None:
            return F.linear(x, self.weight, self.bias)
        if _use_cpu_kernel(self.weight):
            out = torch.cat([expert_matvec(x, self.weight, state.experts, state.expert_size, c * width)
                             for c in range(self.chunks)], dim=-1).to(x.dtype)
            if bias is not None:
                out = out + torch.cat([bias[c * width + state.rows()] for c in range(self.chunks)])
            return out.reshape(*x.shape[:-1], -1)
        segments = state.segments()  # pure torch: one slice of the weights per run of adjacent experts
        parts = [F.linear(x, self.weight[c * width + a:c * width + b], None if bias is None else bias[c * width + a:c * width + b])
                 for c in range(self.chunks) for a, b in segments]
        return torch.cat(parts, dim=-1) if parts else x.new_zeros(*x.shape[:-1], 0)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in={inp}, out={out}, chunks={self.chunks}, routes={self.router is not None}"


class RoutedDown(nn.Module):
    """The down projection, stored transposed (``weight_t`` [neurons, out]) so each expert's
    weights are one contiguous block."""

    def __init__(self, base: nn.Module, state: RoutingState):
        super().__init__()
        self.weight_t = nn.Parameter(_as_rows(base, out_is_rows=False).detach().clone().contiguous(), requires_grad=False)
        bias = getattr(base, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._state = state

    def forward(self, h):
        state = self._state
        experts, mask = state.experts, state.mask
        if state.order is not None:
            if state.token_mask is not None:  # a few tokens over the union: zero what each did not select
                shape = h.shape
                keep = state.token_mask.reshape(*shape[:-1], -1, 1).to(h.dtype)
                h = (h.reshape(*shape[:-1], keep.shape[-2], state.expert_size) * keep).reshape(shape)
            out = _triton_matvec_t(h, self.weight_t, state.order, state.count, state.expert_size)
            out = out.to(h.dtype).reshape(*h.shape[:-1], -1)
        elif experts is not None and _use_cpu_kernel(self.weight_t):
            if state.token_mask is not None:  # a few tokens over the union: zero what each did not select
                k, shape = experts.numel(), h.shape
                keep = state.token_mask.reshape(*shape[:-1], k, 1).to(h.dtype)
                h = (h.reshape(*shape[:-1], k, state.expert_size) * keep).reshape(shape)
            out = expert_matvec_t(h, self.weight_t, experts, state.expert_size).to(h.dtype).reshape(*h.shape[:-1], -1)
        elif experts is not None:
            flat = h.reshape(1, -1)
            out = flat.new_zeros(1, self.weight_t.shape[1])
            offset = 0
            for a, b in state.segments():  # out += h[selected rows] @ weight_t[selected rows], one slice per run
                out.addmm_(flat[:, offset:offset + b - a], self.weight_t[a:b])
                offset += b - a
            out = out.reshape(*h.shape[:-1], -1)
        else:
            if mask is not None:
                shape = h.shape
                h = (h.reshape(*shape[:-1], state.num_experts, state.expert_size) * mask.unsqueeze(-1).to(h.dtype)).reshape(shape)
            out = h @ self.weight_t
        state.clear()
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.weight_t.shape[0]}, out={self.weight_t.shape[1]}"


def install_routed_ffns(model: nn.Module, config) -> None:
    """Swap every FFN's projections (listed in ``config.lte_ffn``) for routed ones, in place.

    Weights are taken from the projections being replaced, so the same call builds an empty
    model for ``from_pretrained`` and converts a trained one for export.
    """
    ffn = config.lte_ffn
    for index, entry in enumerate(ffn["hosts"]):  # {"path", "first" (call order), "down", "fused_chunks"}
        host = model.get_submodule(entry["path"])
        down = host.get_submodule(entry["down"])
        width = _as_rows(down, out_is_rows=False).shape[0]
        state = RoutingState(width // ffn["expert_size"], ffn["expert_size"])
        first_weight = _as_rows(host.get_submodule(entry["first"][0]), out_is_rows=True)
        router = nn.Linear(first_weight.shape[1], state.num_experts, bias=ffn.get("router_bias", False),
                           device=first_weight.device, dtype=first_weight.dtype)
        for position, name in enumerate(entry["first"]):
            routed = RoutedFirst(host.get_submodule(name), state, entry.get("fused_chunks", 1),
                                 router=router if position == 0 else None, config=config, layer_index=index)
            host.set_submodule(name, routed)
        host.set_submodule(entry["down"], RoutedDown(down, state))


def routing_states(model: nn.Module) -> list[RoutingState]:
    """Each FFN layer's routing state, in depth order."""
    return [m._state for m in model.modules() if isinstance(m, RoutedFirst) and m.router is not None]


_BaseForCausalLM = getattr(transformers, BASE_ARCHITECTURE)


class LTEForCausalLM(_BaseForCausalLM):
    """The base causal LM with routed FFNs; ``config.lte_mode = "dense"`` runs every expert."""

    config_class = LTEConfig

    def __init__(self, config: LTEConfig):
        super().__init__(config)
        install_routed_ffns(self, config)

    def lte_sparsity(self) -> list[float | None]:
        """Per-layer fraction of FFN neurons skipped since the last reset (needs
        ``config.lte_track_sparsity = True``)."""
        return [state.sparsity() for state in routing_states(self)]

    def lte_reset_sparsity(self) -> None:
        for state in routing_states(self):
            state.reset_sparsity()
