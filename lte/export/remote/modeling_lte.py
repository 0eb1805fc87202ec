"""An exported LTE model: the base causal LM whose FFN projections run only routed experts.

The checkpoint's weight files are the base model's checkpoint: every base tensor keeps its name,
shape and layout, and nothing else is there, so the base class (and any tool that knows the
architecture) loads it as the dense model. The routers, one per FFN layer, are in their own file
(format 2, ``lte_layout.py``: ``lte/routers.safetensors``), which ``from_pretrained`` below reads and
``save_pretrained`` writes. With ``trust_remote_code=True`` the class below, which *is* the
base class, turns each FFN projection into a routed one **in place**: the module keeps its
class (``nn.Linear``, or GPT-2's ``Conv1D``) as a base class and its parameters, and gains a
forward that skips experts. So PEFT and other tools that look for linear layers find the FFN.
The model's own FFN forward still applies the activation, so one mechanism serves every family:

* the first projection (gate, or the input projection) owns the layer's sigmoid router and
  decides, per token, which experts run: those with ``sigmoid(router(x)) > threshold``;
* without autograd (``torch.no_grad``/inference mode, or nothing requiring grad), for 1 to 8
  tokens and a kernel available, the first projections compute only the selected experts'
  rows (over the union of the tokens' experts, each token's others zeroed) and the down
  projection multiplies by only those experts' weights; on CPU the C++ kernel of
  ``lte_kernels_cpu.py``, on GPU the Triton kernels of ``lte_kernels_triton.py`` (both beside
  this file, written by ``lte export``). Without a kernel, one token runs pure-torch weight
  slices, one per run of adjacent selected experts;
* otherwise (prefill, batches, training) every row is computed and the skipped neurons are
  zeroed before the down projection: the same result, and correct gradients for every weight.

Weights are expert-contiguous: expert ``e`` owns neurons ``e*E .. (e+1)*E-1`` (``E =
expert_size``). The kernels read the down projection as [neurons, out] rows; for an
``nn.Linear`` (stored [out, neurons]) :meth:`LTEForCausalLM.lte_relayout` (run by
``from_pretrained``) re-strides ``weight`` in place to a transposed memory layout with the same
shape and values: one copy of the weights, nothing else changes.
Only torch, transformers and safetensors are imported (and compressed-tensors, which loading a quantized
export needs anyway: ``lte export --quantize``, docs/quantization.md).
"""

import functools
import json
import os
import re

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .configuration_lte import BASE_ARCHITECTURE, LTEConfig

try:  # the export's copy of the file layout (lte/export/remote/layout.py), written by `lte export`
    from .lte_layout import (
        FORMAT_KEY,
        FORMAT_VERSION,
        HUB_KWARGS,
        check_config,
        check_shapes,
        format_version,
        load_routers,
        router_keys,
        save_routers,
    )
except ImportError:  # this package's own (`from . import`: transformers copies only `from .x import` files)
    from . import layout as _layout

    FORMAT_KEY, FORMAT_VERSION, check_config = _layout.FORMAT_KEY, _layout.FORMAT_VERSION, _layout.check_config
    check_shapes, format_version, router_keys = _layout.check_shapes, _layout.format_version, _layout.router_keys
    HUB_KWARGS, load_routers, save_routers = _layout.HUB_KWARGS, _layout.load_routers, _layout.save_routers

try:  # routed experts of MoE layers (the package's remote/experts.py), written next to this file by `lte export`
    from .lte_experts import (
        MAX_UNION_TOKENS,
        ExpertsRouter,
        install_routed_experts,
        kernels as expert_kernels,
        relayout_experts,
    )
except ImportError:  # this package's own (`from . import`: transformers copies only `from .x import` files)
    from . import experts as _experts

    ExpertsRouter, install_routed_experts = _experts.ExpertsRouter, _experts.install_routed_experts
    expert_kernels, relayout_experts = _experts.kernels, _experts.relayout_experts
    MAX_UNION_TOKENS = _experts.MAX_UNION_TOKENS

try:  # the CPU kernel (the project's kernels/cpu.py), written next to this file by `lte export`
    from .lte_kernels_cpu import (
        available as _cpu_kernel_available,
        select_experts as _cpu_select,
        slot_matvec as _cpu_matvec,
        slot_matvec_t as _cpu_matvec_t,
    )
except ImportError:
    _cpu_kernel_available = None

try:  # the kernels' quantized row layout (the project's kernels/quant.py), written next to this file by `lte export`
    from .lte_quant import pack as _quant_pack, transposed as _quant_transposed
except ImportError:
    _quant_pack = _quant_transposed = None

try:  # its dense product on the kernels' layout (the masked path's down projection on CPU)
    from .lte_kernels_cpu import dense_matmul_t as _cpu_dense_matmul_t
except ImportError:
    _cpu_dense_matmul_t = None


try:  # the GPU kernels (the project's kernels/triton_ffn.py), written next to this file by `lte export`
    from .lte_kernels_triton import (
        available as _triton_available,
        expert_matvec as _triton_matvec,
        expert_matvec_t as _triton_matvec_t,
        select_experts as _triton_select,
    )
except ImportError:
    _triton_available = None


# LTE_FORCE_TRITON=1 runs the Triton path on CPU tensors (under TRITON_INTERPRET=1): how CI tests
# it. Read once here, not in the decode step.
_FORCE_TRITON = os.environ.get("LTE_FORCE_TRITON") == "1"


def _use_triton(device: torch.device) -> bool:
    return (device.type == "cuda" or _FORCE_TRITON) and _triton_available is not None and _triton_available()


def _use_cpu_kernel(weight: torch.Tensor) -> bool:
    return (
        _cpu_kernel_available is not None
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and _cpu_kernel_available()
    )


def _kernels(weight: torch.Tensor):
    """(select, matvec, matvec_t) for ``weight``'s device and dtype, or None: both kernel sets
    take the selection as (order, count) device tensors and return a slot per expert."""
    if _use_triton(weight.device):
        return _triton_select, _triton_matvec, _triton_matvec_t
    if _use_cpu_kernel(weight):
        return _cpu_select, _cpu_matvec, _cpu_matvec_t
    return None


# Up to this many tokens, the kernels compute the union of their experts (each weight row is read
# once for all of them); on CPU even a full union is faster than F.linear's small GEMMs where
# measured (`lte bench kernel --batch 4`). More tokens run the masked dense path.
# (MAX_UNION_TOKENS, defined once in experts.py for the dense FFNs and the MoE experts alike)


def _rows(module: nn.Module, out_is_rows: bool) -> torch.Tensor:
    """``module.weight`` viewed as [out, in] (``out_is_rows``) or [in, out]; ``nn.Linear`` stores
    [out, in], GPT-2's ``Conv1D`` [in, out]."""
    weight = module.weight
    return weight if isinstance(module, nn.Linear) == out_is_rows else weight.t()


def _relayout(module: nn.Module, out_is_rows: bool) -> None:
    """Make the kernel's row view of ``module.weight`` contiguous, in place: same Parameter, same
    shape and values, another memory layout. A no-op when it already is."""
    view = _rows(module, out_is_rows)
    if not view.is_contiguous():
        with torch.no_grad():
            rows = view.contiguous()
            module.weight.data = rows if rows.shape == module.weight.shape else rows.t()


class Router(nn.Module):
    """The layer's sigmoid router: ``sigmoid(x @ weight.T + bias)`` scores one gate per expert.

    Deliberately not an ``nn.Linear``: tools that adapt every linear layer (PEFT's
    ``all-linear``) must not put an adapter here, where hard thresholding passes no gradient."""

    def __init__(self, in_features: int, num_experts: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class SkipCounter:
    """One FFN layer's skipped neuron groups over the rows it routed while ``config.lte_track_sparsity`` was
    set: a token's, or, in routed MoE experts, a (token, selected expert) pair's. Summed on the device
    (no sync per step)."""

    def __init__(self):
        self.reset()

    def add(self, on: torch.Tensor) -> None:
        """``on`` [..., groups]: which groups each row kept."""
        off = (~on).sum(dtype=torch.float64)
        self.skipped = off if self.skipped is None else self.skipped + off
        self.groups += on.numel()

    def sparsity(self) -> float | None:
        """Fraction of groups (= of neurons) skipped; None when nothing was routed."""
        return float(self.skipped) / self.groups if self.groups else None

    def reset(self) -> None:
        self.skipped, self.groups = None, 0


class RoutingState:
    """What one FFN layer's router decided for the current forward, shared by its projections.

    ``order``/``count`` (kernel path): every expert ordered selected-first, and how many are
    selected (the union of a few tokens'; ``token_mask`` [tokens, experts] in slot order says
    whose). ``experts`` (pure-torch path, one token): the selected experts. ``mask`` [...,
    experts] (masked path): per token. All None: every expert runs.
    """

    def __init__(self, host: nn.Module, first: list[str], down: str, num_experts: int, expert_size: int):
        self.host, self.first, self.down = host, list(first), down
        self.projections: list[nn.Module] = []  # the routed modules, first ones then down
        self.num_experts = num_experts
        self.expert_size = expert_size
        self.kernels = None
        self.experts = self.token_mask = self.order = self.count = self.mask = None
        self.skips = SkipCounter()

    def needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for m in self.projections for p in m.parameters(recurse=False))

    def wrapped(self) -> bool:
        """Whether a projection was replaced by a wrapper (a PEFT adapter layer...): the compact
        paths change output widths, which only this file's forwards know about. A wrapped down
        projection gets its input masked by a pre-hook, so an adapter sees what the routed layer
        does (unmerged = merged)."""
        down = self.host.get_submodule(self.down)
        if down is not self.projections[-1] and not getattr(down, "_lte_masks_input", False):
            down.register_forward_pre_hook(self._mask_hook)
            down._lte_masks_input = True
        return down is not self.projections[-1] or any(
            self.host.get_submodule(name) is not module
            for name, module in zip(self.first, self.projections[:-1], strict=True)
        )

    def _mask_hook(self, module, args):
        if self.mask is None:
            return None
        return (self.apply_mask(args[0]), *args[1:])

    def route(self, x, router: Router, threshold: float, track: bool) -> None:
        with torch.no_grad():  # a hard threshold: no gradient reaches the router
            on = torch.sigmoid(router(x.to(router.weight.dtype))) > threshold
        if track:
            self.skips.add(on)
        tokens = on.shape[:-1].numel()
        self.clear()
        wrapped = self.wrapped()  # every call: it also masks a new wrapper's input
        if wrapped:  # an adapter changes the weights the integer rows stand for (and a merge writes them via .data)
            drop_quantized_rows(self.projections)
        compact = tokens <= MAX_UNION_TOKENS and not wrapped and not self.needs_grad(x)
        kernels = _kernels(self.projections[0].weight) if compact else None
        if kernels is not None:
            self.kernels = kernels
            self.order, self.count = kernels[0](on)  # the union, on the device
            if tokens > 1:
                self.token_mask = on.reshape(tokens, -1)[:, self.order.long()]  # in slot order
        elif compact and tokens == 1:
            self.experts = on.reshape(-1).nonzero().squeeze(1)
        else:
            self.mask = on

    def apply_mask(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [..., neurons] with each token's unselected experts' neurons zeroed."""
        shape = h.shape
        keep = self.mask.unsqueeze(-1).to(h.dtype)
        return (h.reshape(*shape[:-1], self.num_experts, self.expert_size) * keep).reshape(shape)

    def segments(self) -> list[tuple[int, int]]:
        """Row ranges of the runs of selected experts, e.g. experts 2, 3, 7 -> [(2E, 4E), (7E, 8E)]."""
        flags = torch.zeros(self.num_experts + 2, dtype=torch.int8)
        flags[self.experts.cpu() + 1] = 1
        edges = torch.diff(flags).nonzero().squeeze(1).tolist()
        size = self.expert_size
        return [(start * size, stop * size) for start, stop in zip(edges[0::2], edges[1::2], strict=True)]

    def clear(self) -> None:
        self.experts = self.token_mask = self.order = self.count = self.mask = None


class RoutedFirst:
    """Mixed into a first FFN projection's own class (gate, up, fused gate_up or input).

    The layer's first-called projection carries ``router`` and routes; the others read the
    shared :class:`RoutingState`. ``lte_chunks`` > 1 is a fused projection (Phi-3's gate_up)
    that stacks that many blocks of neurons."""

    def forward(self, x):
        state = self.lte_state
        if self.router is not None:
            config = self.lte_config
            if config.lte_routing == "dense":
                state.clear()
            else:
                state.route(x, self.router, config.lte_thresholds[self.lte_layer_index], config.lte_track_sparsity)
        if state.order is None and state.experts is None:
            return super().forward(x)  # every neuron: the base class's own forward
        rows = _rows(self, out_is_rows=True)
        width, size, bias = rows.shape[0] // self.lte_chunks, state.expert_size, self.bias
        if state.order is not None:  # kernels: a slot per expert, the selected ones first
            matvec, quantized = state.kernels[1], _quantized_rows(self, x)
            if quantized is None:
                _relayout(self, out_is_rows=True)
                rows = _rows(self, out_is_rows=True)
            else:
                rows, scales = quantized
                matvec = functools.partial(matvec, scales=scales)
            out = torch.cat(
                [matvec(x, rows, state.order, state.count, size, c * width) for c in range(self.lte_chunks)], dim=-1
            ).to(x.dtype)
            if bias is not None:
                slots = state.order.long()
                out = out + torch.cat(
                    [
                        bias[c * width : (c + 1) * width].view(-1, size)[slots].reshape(-1)
                        for c in range(self.lte_chunks)
                    ]
                )
            return out.reshape(*x.shape[:-1], -1)
        segments = state.segments()  # pure torch: one slice of the weights per run of adjacent experts
        parts = [
            F.linear(
                x, rows[c * width + a : c * width + b], None if bias is None else bias[c * width + a : c * width + b]
            )
            for c in range(self.lte_chunks)
            for a, b in segments
        ]
        return torch.cat(parts, dim=-1) if parts else x.new_zeros(*x.shape[:-1], 0)


class RoutedDown:
    """Mixed into the down projection's own class: multiplies only the selected experts' rows."""

    def forward(self, h):
        state = self.lte_state
        if state.order is not None:
            if state.token_mask is not None:  # a few tokens over the union: zero what each did not select
                shape = h.shape
                keep = state.token_mask.reshape(*shape[:-1], -1, 1).to(h.dtype)
                h = (h.reshape(*shape[:-1], keep.shape[-2], state.expert_size) * keep).reshape(shape)
            quantized = _quantized_rows(self, h)
            if quantized is None:
                _relayout(self, out_is_rows=False)
                out = state.kernels[2](h, _rows(self, out_is_rows=False), state.order, state.count, state.expert_size)
            else:
                rows, scales = quantized
                hidden = _rows(self, out_is_rows=False).shape[1]
                out = state.kernels[2](h, rows, state.order, state.count, state.expert_size, scales, hidden)
            out = out.to(h.dtype).reshape(*h.shape[:-1], -1)
        elif state.experts is not None:
            weight_t = _rows(self, out_is_rows=False)
            flat = h.reshape(1, -1)
            out = flat.new_zeros(1, weight_t.shape[1])
            offset = 0
            for a, b in state.segments():  # out += h[selected rows] @ weight_t[selected rows], one slice per run
                out.addmm_(flat[:, offset : offset + b - a], weight_t[a:b])
                offset += b - a
            out = out.reshape(*h.shape[:-1], -1)
        else:
            if state.mask is not None:
                h = state.apply_mask(h)
            state.clear()
            weight_t = _rows(self, out_is_rows=False)
            if _cpu_dense_matmul_t is not None and weight_t.is_contiguous() and weight_t.dtype == torch.bfloat16:
                # bf16 on the kernels' layout (one row per neuron; GPT-2's Conv1D stores it so): see dense_matmul_t
                out = _cpu_dense_matmul_t(h, weight_t)
                return out if self.bias is None else out + self.bias
            return super().forward(h)  # every neuron (the skipped ones zeroed): the base class's own forward
        state.clear()
        return out if self.bias is None else out + self.bias


def _weight_stamp(module: nn.Module) -> tuple:
    """What changes when ``module.weight`` is written (in place: its version; replaced: its storage). Writes
    through ``.data`` change neither: see :meth:`LTEForCausalLM.lte_drop_quantized_rows`."""
    weight = module.weight
    return weight.data_ptr(), weight._version


class QuantizedDense:
    """Mixed into a compressed ``nn.Linear`` outside the routed FFNs (attention, an FFN left dense) whose integer
    rows the kernels read: decoding (up to ``MAX_UNION_TOKENS`` tokens, no gradient) multiplies them with every
    row selected, so the whole model reads 4.5/8.5 bits per weight per token, not only its FFNs; everything else
    runs the dequantized weight (the base class's forward). The rows are dropped, as the routed projections'
    are, once the weight is written or an adapter wraps the layer."""

    def forward(self, x):
        quantized = None
        if x.numel() // x.shape[-1] <= MAX_UNION_TOKENS and not (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            owner, name = self.lte_qowner
            if getattr(owner, name, None) is not self:  # wrapped (a PEFT adapter): the rows are not its weights
                drop_quantized_rows([self])
            quantized = _quantized_rows(self, x)
        kernels = _kernels(self.weight) if quantized is not None else None
        if kernels is None:
            return super().forward(x)
        rows, scales = quantized
        order, count = self.lte_qslots
        out = kernels[1](x, rows, order, count, _QUANT_SLOT, 0, scales=scales).to(x.dtype)
        out = out.reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


class _Owner(tuple):
    """(parent module, attribute name) of a :class:`QuantizedDense` layer: a plain tuple, so the parent is not
    registered a second time as a submodule."""


# The dense integer rows are read in slots of this many rows (the kernels' slot: a multiple of 32).
_QUANT_SLOT = 32


def drop_quantized_rows(modules) -> None:
    for module in modules:
        if getattr(module, "lte_qweight", None) is not None:
            module.lte_qweight = module.lte_qscales = None


def _quantized_rows(module: nn.Module, x: torch.Tensor):
    """(rows, scales) of a quantized export's layer (a routed projection or a :class:`QuantizedDense`) for the
    kernels (CPU or Triton: both read them), or None (float rows).
    Rows are dropped for good once ``weight`` was written after they were made (an optimizer step,
    ``load_state_dict``, a new tensor) or an adapter wraps the layer: they would be the old weights."""
    rows = getattr(module, "lte_qweight", None)
    if rows is None or rows.device != x.device:
        return None
    if not torch.compiler.is_compiling() and _weight_stamp(module) != getattr(module, "lte_qstamp", None):
        drop_quantized_rows([module])
        return None
    return rows, module.lte_qscales


def _kernel_reads(module: nn.Module, args, expert_size: int) -> bool:
    """Whether the kernels read a compressed-tensors weight scheme as stored: symmetric int8/int4 groups
    of a multiple of 32 along the input, in order (no GPTQ activation order); for a first projection a group
    that divides the expert size (its groups run along rows the kernel selects by expert)."""
    return (
        str(getattr(args, "type", "")).endswith("int")
        and args.symmetric
        and str(args.strategy).endswith("group")
        and args.num_bits in (4, 8)
        and bool(args.group_size)
        and args.group_size % 32 == 0
        and not getattr(args, "actorder", None)
        and getattr(module, "weight_g_idx", None) is None
        and module.in_features % args.group_size == 0  # whole groups (a rounded-up last group is another layout)
        and (isinstance(module, RoutedDown) or expert_size % args.group_size == 0)
    )


def install_quantized_rows(model: nn.Module) -> None:
    """A compressed-tensors checkpoint (``lte export --quantize``) loads with its Linear layers compressed
    (``weight_packed``, ``weight_scale``). Keep the integers the kernels (CPU and Triton) can read, on their
    device, in their layout (``lte_qweight``, ``lte_qscales``): each routed projection's (the first projections'
    rows as stored, the down projection's read transposed with its stored groups, never rounded twice) and every
    other Linear's (attention: :class:`QuantizedDense`); then decompress the model, so everything else (prefill,
    batches, training) runs the dequantized weights, as the base class does."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is None or not hasattr(compressor, "decompress_model"):
        return
    if _quant_pack is not None:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        for name, module in list(model.named_modules()):
            packed, state = getattr(module, "weight_packed", None), getattr(module, "lte_state", None)
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if packed is None or args is None:
                continue
            dense = state is None and isinstance(module, nn.Linear) and module.out_features % _QUANT_SLOT == 0
            if not (dense or state is not None) or not _kernel_reads(
                module, args, _QUANT_SLOT if dense else state.expert_size
            ):
                continue
            q = unpack_from_int32(packed.data, args.num_bits, torch.Size(module.weight_shape.tolist()))
            scales = module.weight_scale.data
            if dense or isinstance(module, RoutedFirst):  # [out, in] rows, groups along in: the kernel's own layout
                module.lte_qweight = _quant_pack(q, args.num_bits, args.group_size)
                module.lte_qscales = scales.to(torch.float16).contiguous()
            elif isinstance(module, RoutedDown):
                module.lte_qweight, module.lte_qscales = _quant_transposed(q, scales, args.num_bits)
            if dense:
                parent, _, attribute = name.rpartition(".")
                slots = module.out_features // _QUANT_SLOT
                module.lte_qowner = _Owner((model.get_submodule(parent), attribute))
                module.lte_qslots = (
                    torch.arange(slots, dtype=torch.int32, device=packed.device),
                    torch.tensor([slots], dtype=torch.int32, device=packed.device),
                )
                module.__class__ = _routed_class(QuantizedDense, type(module))
    compressor.decompress_model(model)  # its forward wrapper calls type(module).forward: QuantizedDense's too


def stamp_quantized_rows(model: nn.Module) -> None:
    """Record the weights the integer rows stand for (after loading and re-striding): see _quantized_rows."""
    for module in model.modules():
        if getattr(module, "lte_qweight", None) is not None:
            module.lte_qstamp = _weight_stamp(module)


_ROUTED_CLASSES: dict = {}


def _routed_class(role: type, base: type) -> type:
    """``role`` mixed into ``base`` (e.g. RoutedFirst + nn.Linear -> RoutedFirstLinear), made
    once per pair and importable from this module (so models pickle)."""
    if issubclass(base, role):
        return base
    key = (role, base)
    if key not in _ROUTED_CLASSES:
        name = f"{role.__name__}{base.__name__}"
        cls = type(name, (role, base), {"__module__": __name__, "__qualname__": name, "__doc__": role.__doc__})
        _ROUTED_CLASSES[key] = globals()[name] = cls
    return _ROUTED_CLASSES[key]


def _make_routed(module: nn.Module, role: type, state: RoutingState, **attributes) -> None:
    module.__class__ = _routed_class(role, type(module))
    module.lte_state = state
    for name, value in attributes.items():
        setattr(module, name, value)
    state.projections.append(module)


def install_routed_ffns(model: nn.Module, config) -> None:
    """Make every FFN's projections (``config.lte_ffn["hosts"]``) routed, in place.

    The modules keep their parameters and their class (as a base class); each layer's first
    projection in call order gains a :class:`Router`. The same call builds an empty model for
    ``from_pretrained`` and converts a trained one for export."""
    ffn = config.lte_ffn
    size = ffn["expert_size"]
    for index, spec in enumerate(ffn["hosts"]):
        if spec.get("experts"):  # an MoE layer's fused routed experts
            install_routed_experts(model, config, index, spec, _kernels, SkipCounter())
            continue
        host = model.get_submodule(spec["path"])
        neurons = _rows(host.get_submodule(spec["down"]), out_is_rows=False).shape[0]
        chunks = spec.get("fused_chunks", 1)
        state = RoutingState(host, spec["first"], spec["down"], neurons // size, size)
        for position, name in enumerate(spec["first"]):
            module = host.get_submodule(name)
            router = None
            if position == 0:
                weight = _rows(module, out_is_rows=True)
                router = Router(
                    weight.shape[1],
                    state.num_experts,
                    bias=ffn.get("router_bias", False),
                    device=weight.device,
                    dtype=weight.dtype,
                )
            _make_routed(
                module, RoutedFirst, state, router=router, lte_chunks=chunks, lte_config=config, lte_layer_index=index
            )
        _make_routed(host.get_submodule(spec["down"]), RoutedDown, state)
    # The routers live in their own file (layout.ROUTERS_FILE), never in the model's weight files.
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    model._keys_to_ignore_on_save = ignored | set(router_keys(config))


def relayout_routed_ffns(model: nn.Module) -> None:
    """Give every routed projection the memory layout its kernel reads (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, RoutedFirst):
            _relayout(module, out_is_rows=True)
        elif isinstance(module, RoutedDown):
            _relayout(module, out_is_rows=False)
        elif isinstance(getattr(module, "lte_router", None), ExpertsRouter) and expert_kernels(module):
            relayout_experts(module)


def write_routers(model: nn.Module, directory, given: dict | None = None) -> str:
    """Write the model's routers to ``directory``'s routers file (format 2), taking each from ``given``
    where it is there (under ZeRO-3/FSDP the Trainer saves a gathered state dict; the parameters are shards)."""
    parameters, given = dict(model.named_parameters()), given or {}
    return save_routers({name: given.get(name, parameters.get(name)) for name in router_keys(model.config)}, directory)


def set_routers(model: nn.Module, routers: dict, path: str) -> None:
    """Make the model's routers ``routers`` (checked against the FFN shapes): new real tensors on the
    device of the projection that owns them, in its dtype, also where loading left them on meta."""
    names = router_keys(model.config)
    check_shapes(routers, {name: model.get_parameter(name).shape for name in names}, path)
    for name in names:
        owner, attribute = name.rsplit(".", 1)
        router = model.get_submodule(owner)
        old = getattr(router, attribute)
        projection = next(model.get_submodule(owner.rsplit(".", 1)[0]).parameters(recurse=False))  # the owner's
        device = projection.device if old.device.type == "meta" else old.device
        value = routers[name].to(device=device, dtype=old.dtype)
        setattr(router, attribute, nn.Parameter(value, requires_grad=old.requires_grad))


def skip_counters(model: nn.Module) -> list[SkipCounter]:
    """Each routed layer's counter (dense FFNs and routed experts), in the order of ``config.lte_ffn["hosts"]``."""
    counters = {}
    for module in model.modules():
        if isinstance(module, RoutedFirst) and module.router is not None:
            counters[module.lte_layer_index] = module.lte_state.skips
        elif isinstance(getattr(module, "lte_router", None), ExpertsRouter):
            counters[module.lte_layer_index] = module.lte_skips
    return [counters[index] for index in sorted(counters)]


_BaseForCausalLM = getattr(transformers, BASE_ARCHITECTURE)


def _share_base_conversions() -> None:
    """Read (and write) the checkpoint's weight names as the base class does. transformers looks a
    model's conversions up by class name, then by ``model_type``; this class's name gets the base class's
    own mapping by name (GPT-NeoX: ``embed_out`` -> ``lm_head``) or ``None``, so that the lookup falls
    through to the ``model_type``'s mapping exactly once, as for the base class (a copy under this name
    would run again for the inner model: laguna's ``shared_expert.`` -> ``shared_experts.`` is not
    idempotent)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: no conversions
        return
    register_checkpoint_conversion_mapping(
        "LTEForCausalLM", get_checkpoint_conversion_mapping(BASE_ARCHITECTURE), overwrite=True
    )


class LTEForCausalLM(_BaseForCausalLM):
    """The base causal LM with routed FFNs; ``config.lte_routing = "dense"`` runs every expert."""

    config_class = LTEConfig

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """As the base class: ``generate`` decides by class name (MiniMax keeps a cache of its own)."""
        supports = getattr(_BaseForCausalLM, "_supports_default_dynamic_cache", None)
        try:
            return True if supports is None else supports()
        except TypeError:  # transformers 4: an instance method
            return True

    def __init__(self, config: LTEConfig):
        super().__init__(config)
        install_routed_ffns(self, config)
        _share_base_conversions()  # per instance: exports of other bases may share this class name
        if format_version(config) >= 2:  # the routers come from their own file, not the weights
            missing = set(self._keys_to_ignore_on_load_missing or ())
            self._keys_to_ignore_on_load_missing = missing | {f"^{re.escape(k)}$" for k in router_keys(config)}

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: this is the base class, initialised by the base class's own ``_init_weights``.
        As custom code, transformers would skip ``_init_weights`` for modules without their own
        parameters, leaving non-persistent buffers they set (FalconH1's ``mup_vector``) as
        uninitialised memory after ``from_pretrained``."""
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The base class's ``from_pretrained``, then (format 2) the routers from their own file,
        located like the weights (local folder or hub repository, ``subfolder``, ``revision``...)."""
        subfolder = kwargs.get("subfolder") or ""
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}

        def routers_of(config):
            check_config(config)
            if format_version(config) < 2:
                return None  # format 1: the routers are among the weights
            return load_routers(config, pretrained_model_name_or_path, subfolder, **hub)

        config = kwargs.get("config")
        checked = isinstance(config, LTEConfig)  # AutoModel passes it: check before loading any weight
        routers = routers_of(config) if checked else None
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if not checked:
            routers = routers_of(model.config)
        install_quantized_rows(model)
        if routers is not None:
            set_routers(model, routers, os.path.join(str(pretrained_model_name_or_path), subfolder, "lte"))
        model.lte_relayout()
        stamp_quantized_rows(model)
        return loaded

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, push_to_hub: bool = False, **kwargs):
        """The base class's ``save_pretrained`` in format 2: the base tensors in the weight files,
        the routers in ``lte/routers.safetensors``, ``architectures`` kept the base class's (as
        ``lte export`` writes it), so a saved copy still loads dense in plain loaders and engines.
        ``push_to_hub=True`` uploads after all of it (through :meth:`push_to_hub`)."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
        self.config.lte_format_version = FORMAT_VERSION
        # The routers of a caller's state dict, read now: save_pretrained deletes the ignored keys from it.
        given = {k: v for k, v in (kwargs.get("state_dict") or {}).items() if k in set(router_keys(self.config))}
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if not is_main_process:
            return
        write_routers(self, save_directory, given)
        config_file = os.path.join(save_directory, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
            config.update({"architectures": [BASE_ARCHITECTURE], FORMAT_KEY: FORMAT_VERSION})
            with open(config_file, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        if push_to_hub:
            repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)

    def lte_relayout(self) -> None:
        """Re-stride the FFN weights for the kernels (``from_pretrained`` does it; call it again
        after replacing a weight's tensor; the kernel paths also do it on first use)."""
        relayout_routed_ffns(self)

    def lte_drop_quantized_rows(self) -> None:
        """Stop decoding from a quantized export's integer rows (``lte export --quantize``) and run the float
        weights: call it after writing weights through ``.data`` (as PEFT's ``merge_and_unload`` does),
        which the rows' staleness check cannot see. Writes through the parameters drop them by themselves."""
        drop_quantized_rows(self.modules())

    def lte_sparsity(self) -> list[float | None]:
        """Per-layer fraction of FFN neurons skipped since the last reset (needs
        ``config.lte_track_sparsity = True``)."""
        return [counter.sparsity() for counter in skip_counters(self)]

    def lte_reset_sparsity(self) -> None:
        for counter in skip_counters(self):
            counter.reset()
