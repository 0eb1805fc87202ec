"""Routed experts of an exported LTE model: each selected expert runs only the neuron groups its router keeps.

The export keeps the base checkpoint's expert tensors as they are (transformers converts them to its
fused in-memory layout on load and back on save); each fused experts module gains a child
``lte_router`` (``weight`` [E, G, H], ``bias`` [E, G]; stored in ``lte/routers.safetensors`` under
``{host path}.lte_router``) and dispatches, through transformers' experts interface, to
:data:`IMPLEMENTATION`: for every expert the model's own router selected, the token's groups with
``sigmoid(router) > threshold`` run. Two paths compute it:

* **kernel** (an expert that received at most :data:`MAX_UNION_TOKENS` tokens; ``[gate; up]`` concatenated
  or up-only, no biases; on CPU in fp32 or bf16 the project's CPU kernel, ``lte_kernels_cpu.py``, on CUDA
  the Triton kernels, ``lte_kernels_triton.py``): the slot kernels the dense FFNs use, on the expert's own
  slice of the fused tensors (gate rows at offset 0, up rows at offset ``I``), read only the rows of the
  groups kept by any of those tokens; each token's other groups are zeroed; the down projection reads one
  row per kept neuron. Decode (one token per step) runs here, all k selected experts at once: their
  kept groups are the slots of one selection over every expert's rows (:func:`_kernel_token`).
  :func:`relayout_experts` stores each expert's rows the way the kernels read them (same parameters,
  shapes and values; ``from_pretrained`` does it).
* **masked** (everything else: many tokens per expert, gpt-oss's interleaved or biased experts, a forward
  that needs gradients):
  every neuron of the selected experts is computed and the skipped groups are zeroed before the down
  projection, so it is not faster than the base model.

The layout facts (gated, transposed, concatenated, biased) are transformers' ``use_experts_implementation``
flags, so one forward serves every family.

Copied into each export as ``lte_experts.py``; imports torch, and the kernel file written beside it
where there is one. The training-time counterpart is ``lte.model.experts``.
"""

import torch
import torch.nn.functional as F
from torch import nn

try:  # the CPU kernel's dense product (the project's kernels/cpu.py), written next to this file by `lte export`
    from .lte_kernels_cpu import available as _cpu_kernel_available, dense_matmul_t as _cpu_dense_matmul_t
except ImportError:  # the package's own copy (lte.export.remote)
    _cpu_kernel_available = None

IMPLEMENTATION = "lte_routed"

# Up to this many tokens (per dense FFN in modeling_lte, per expert here), the kernels read the rows of the
# union of their kept experts or groups once for all of them: measured with `lte bench kernel --batch`. The one
# definition: modeling_lte and the vLLM plugin import it.
MAX_UNION_TOKENS = 8


class ExpertsRouter(nn.Module):
    """One MoE layer's LTE routers, one [G, H] block per routed expert (not an ``nn.Linear``: PEFT's
    ``all-linear`` must not adapt it)."""

    def __init__(self, num_experts, groups, d_model, bias, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, groups, d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_experts, groups, device=device, dtype=dtype)) if bias else None


def width(module) -> int:
    """Neurons per expert, from the down projection and the layout flags."""
    return module.down_proj.shape[1 if module.is_transposed else 2]


def _up(module) -> torch.Tensor:
    return module.gate_up_proj if module.has_gate else module.up_proj


def kernels(module):
    """(select, matvec, matvec_t) for this module's experts, in the slot convention of both kernel files,
    or None: a group's rows must be contiguous within each expert (``[gate; up]`` concatenated, or up-only)
    and unbiased. Which kernels a weight gets (Triton on CUDA, the CPU kernel for fp32 or bf16 on the CPU)
    is modeling_lte's choice for every routed layer, given at install (:func:`install_routed_experts`)."""
    choose = getattr(module, "lte_kernels", None)
    if choose is None or module.has_bias or (module.has_gate and not getattr(module, "is_concatenated", True)):
        return None
    return choose(_up(module))


def _up_rows(module, expert: int) -> torch.Tensor:
    """[out, H]: expert ``expert``'s up projection, one row per output (gate rows, then up rows)."""
    up = _up(module)[expert]
    return up.t() if module.is_transposed else up


def _down_rows(module, expert: int) -> torch.Tensor:
    """[I, H]: expert ``expert``'s down projection, one row per neuron."""
    down = module.down_proj[expert]
    return down if module.is_transposed else down.t()


def relayout_experts(module) -> None:
    """Store every expert's rows the way the kernel reads them (:func:`_up_rows`, :func:`_down_rows`
    contiguous), in place: the same parameters, shapes and values, another memory layout. A no-op when
    they already are. ``from_pretrained`` and ``lte_relayout()`` run it, never a forward."""
    with torch.no_grad():
        for param, rows_are_columns in (
            (_up(module), module.is_transposed),
            (module.down_proj, not module.is_transposed),
        ):
            rows = param.transpose(1, 2) if rows_are_columns else param
            if not rows.is_contiguous():
                rows = rows.contiguous()
                param.data = rows.transpose(1, 2) if rows_are_columns else rows


def _in_kernel_layout(module) -> bool:
    return _up_rows(module, 0).is_contiguous() and _down_rows(module, 0).is_contiguous()


def _activations(module, x, rows, order, count, size, matvec) -> torch.Tensor:
    """The activations of the first ``count`` slots of ``order`` (zeros after): the gate's rows at each slot's
    offset, the up's ``I`` rows further ([gate; up]), then the model's own gate function. [n, slots * size]."""
    proj = matvec(x, rows, order, count, size, 0)
    if module.has_gate:
        proj = torch.cat([proj, matvec(x, rows, order, count, size, width(module))], dim=-1)
    proj = proj.to(x.dtype)
    return module._apply_gate(proj) if module.has_gate else module.act_fn(proj)


def _kernel_expert(module, x, expert: int, keep: torch.Tensor, size: int, kernel_set) -> torch.Tensor:
    """One expert on its few tokens ``x`` [n, H]: only the rows of the groups some token keeps are read
    (their union, selected slots first); each token's other groups are zeroed before the down projection.
    [n, H]."""
    select, matvec, matvec_t = kernel_set
    order, count = select(keep)
    h = _activations(module, x, _up_rows(module, expert), order, count, size, matvec)
    slots = keep[:, order.long()]  # each token's kept groups in slot order (none past the count)
    h = (h.reshape(x.shape[0], -1, size) * slots.unsqueeze(-1).to(h.dtype)).reshape(x.shape[0], -1)
    return matvec_t(h, _down_rows(module, expert), order, count, size).to(x.dtype)


def _all_rows(module):
    """(up [E * out, H], down [E * I, H]): every expert's rows as one row-major matrix each (views), or None
    where they are not one contiguous block (:func:`relayout_experts` makes them so)."""
    up = _up(module).transpose(1, 2) if module.is_transposed else _up(module)
    down = module.down_proj if module.is_transposed else module.down_proj.transpose(1, 2)
    if not (up.is_contiguous() and down.is_contiguous()):
        return None
    return up.reshape(-1, up.shape[-1]), down.reshape(-1, down.shape[-1])


def _kernel_token(module, x, experts, weights, keep, size, kernel_set, rows) -> torch.Tensor:
    """One token ``x`` [1, H] through its k selected ``experts`` at once (decode): the kept groups of all k
    are the slots of one selection over every expert's rows (``keep`` [k, G]), so the layer is one select,
    a matvec per up block and one matvec_t, not a loop over the experts; each slot's rows are scaled by its
    expert's routing weight before the down projection, which sums the k experts. [1, H]."""
    select, matvec, matvec_t = kernel_set
    up_rows, down_rows = rows
    groups = keep.shape[1]
    slots, count = select(keep.reshape(1, -1))  # the k * G groups, kept first
    which = slots.long() // groups  # each slot's position among the k experts
    group = slots.long() % groups
    blocks = 2 if module.has_gate else 1  # [gate; up]: an expert's gate groups, then its up groups at offset I
    first = (experts[which] * (blocks * groups) + group).to(slots.dtype)
    h = _activations(module, x, up_rows, first, count, size, matvec)
    scale = weights[which].float().repeat_interleave(size)  # fp32: the kernels accumulate in fp32
    down = (experts[which] * groups + group).to(slots.dtype)
    return matvec_t(h.float() * scale, down_rows, down, count, size).to(x.dtype)


def _kept(module, x, expert, threshold) -> torch.Tensor:
    """Which groups the LTE router of ``expert`` keeps for each row of ``x`` [n, H] ([n, G]); with ``expert`` the
    k experts of one token (``x`` [1, H]), all k routers in one product ([k, G]). Counted when tracking."""
    router = module.lte_router
    weight = router.weight[expert]
    bias = None if router.bias is None else router.bias[expert].reshape(-1)
    with torch.no_grad():  # a hard threshold: no gradient reaches the router
        scores = F.linear(x.to(weight.dtype), weight.reshape(-1, weight.shape[-1]), bias)
    keep = (torch.sigmoid(scores) > threshold).reshape(-1, weight.shape[-2])
    if module.lte_config.lte_track_sparsity:
        module.lte_skips.add(keep)
    return keep


def routed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Every selected expert on the tokens it received, its unselected neuron groups zeroed."""
    config = self.lte_config
    gated = self.has_gate
    up = self.gate_up_proj if gated else self.up_proj
    up_bias = (self.gate_up_proj_bias if gated else self.up_proj_bias) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    size = config.lte_ffn["expert_size"]
    threshold = config.lte_thresholds[self.lte_layer_index]
    routing = config.lte_routing
    k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    kernel_set = kernels(self) if _in_kernel_layout(self) else None  # re-strided by from_pretrained / lte_relayout()
    grad = torch.is_grad_enabled() and (hidden_states.requires_grad or up.requires_grad or self.down_proj.requires_grad)
    kernel = kernel_set is not None and routing != "dense" and not grad  # no backward: training runs masked
    one_token = kernel and hidden_states.shape[0] == 1 and not getattr(self, "has_post_expert_norm", False)
    if one_token and bool((experts < up.shape[0]).all()) and (rows := _all_rows(self)) is not None:
        keep = _kept(self, hidden_states, experts, threshold)
        return _kernel_token(self, hidden_states, experts, weights, keep, size, kernel_set, rows)
    tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(k)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts[experts < up.shape[0]], minlength=up.shape[0]).tolist()
    cpu_rows = kernel_set is not None and up.device.type == "cpu" and _cpu_kernel_available is not None
    out = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        token = tokens[pairs]
        x = hidden_states[token]
        keep = None if routing == "dense" else _kept(self, x, expert, threshold)
        if kernel and count <= MAX_UNION_TOKENS:
            y = _kernel_expert(self, x, expert, keep, size, kernel_set)
        else:  # masked: every neuron of the expert, the skipped groups zeroed
            proj = F.linear(x, _up_rows(self, expert), None if up_bias is None else up_bias[expert])
            h = self._apply_gate(proj) if gated else self.act_fn(proj)
            if keep is not None:
                h = (h.reshape(count, -1, size) * keep.unsqueeze(-1).to(h.dtype)).reshape(h.shape)
            if cpu_rows:  # down neuron-major; bf16 on a CPU without bf16 instructions: an fp32 GEMM (dense_matmul_t)
                y = _cpu_dense_matmul_t(h, _down_rows(self, expert))
            else:
                y = F.linear(h, _down_rows(self, expert).t(), None if down_bias is None else down_bias[expert])
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * weights[pairs, None]).to(out.dtype))
    return out


def install_routed_experts(model: nn.Module, config, index: int, host: dict, kernels_for, skips) -> None:
    """Give the experts module at ``host["path"]`` its router and the routed forward, in place;
    ``kernels_for(weight)``: the kernel set for a weight, or None (modeling_lte's ``_kernels``);
    ``skips``: the layer's counter of skipped groups (modeling_lte's ``SkipCounter``)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, routed_experts_forward)
    module = model.get_submodule(host["path"])
    up = module.gate_up_proj if module.has_gate else module.up_proj
    in_features = up.shape[1 if module.is_transposed else 2]
    module.lte_router = ExpertsRouter(
        up.shape[0],
        width(module) // config.lte_ffn["expert_size"],
        in_features,
        config.lte_ffn.get("router_bias", False),
        device=up.device,
        dtype=up.dtype,
    )
    module.lte_config, module.lte_layer_index, module.lte_kernels, module.lte_skips = config, index, kernels_for, skips
    config._experts_implementation = IMPLEMENTATION
