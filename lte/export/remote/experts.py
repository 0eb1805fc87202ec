"""Routed experts of an exported LTE model: each selected expert runs only the neuron groups its router keeps.

The export keeps the base checkpoint's expert tensors as they are (transformers converts them to its
fused in-memory layout on load and back on save); each fused experts module gains a child
``lte_router`` (``weight`` [E, G, H], ``bias`` [E, G]; stored in ``lte/routers.safetensors`` under
``{host path}.lte_router``) and dispatches, through transformers' experts interface, to
:data:`IMPLEMENTATION`: for every expert the model's own router selected, the token's groups with
``sigmoid(router) > threshold`` run and the others are zeroed before the down projection (the masked
path: every neuron of the selected experts is still computed; a kernel reading only the kept rows,
with a per-expert row offset, is not built). The layout facts (gated, transposed, concatenated,
biased) are transformers' ``use_experts_implementation`` flags, so one forward serves every family.

Copied into each export as ``lte_experts.py``; imports only torch and transformers. The training-time
counterpart is ``lte.model.experts``.
"""

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATION = "lte_routed"


class ExpertsRouter(nn.Module):
    """One MoE layer's LTE routers, one [G, H] block per routed expert (not an ``nn.Linear``: PEFT's
    ``all-linear`` must not adapt it)."""

    def __init__(self, num_experts, groups, d_model, bias, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, groups, d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_experts, groups, device=device, dtype=dtype)) if bias else None


def _linear(x, weight, bias, transposed):
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def width(module) -> int:
    """Neurons per expert, from the down projection and the layout flags."""
    return module.down_proj.shape[1 if module.is_transposed else 2]


def routed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Every selected expert on the tokens it received, its unselected neuron groups zeroed."""
    config = self.lte_config
    gated, transposed = self.has_gate, self.is_transposed
    up = self.gate_up_proj if gated else self.up_proj
    up_bias = (self.gate_up_proj_bias if gated else self.up_proj_bias) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    router, size = self.lte_router, config.lte_ffn["expert_size"]
    threshold = config.lte_thresholds[self.lte_layer_index]
    routing = config.lte_routing
    k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(k)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts[experts < up.shape[0]], minlength=up.shape[0]).tolist()
    out = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        token = tokens[pairs]
        x = hidden_states[token]
        proj = _linear(x, up[expert], None if up_bias is None else up_bias[expert], transposed)
        h = self._apply_gate(proj) if gated else self.act_fn(proj)
        if routing != "dense":
            bias = None if router.bias is None else router.bias[expert]
            with torch.no_grad():
                keep = torch.sigmoid(F.linear(x.to(router.weight.dtype), router.weight[expert], bias)) > threshold
            h = (h.reshape(count, -1, size) * keep.unsqueeze(-1).to(h.dtype)).reshape(h.shape)
        y = _linear(h, self.down_proj[expert], None if down_bias is None else down_bias[expert], transposed)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * weights[pairs, None]).to(out.dtype))
    return out


def install_routed_experts(model: nn.Module, config, index: int, host: dict) -> None:
    """Give the experts module at ``host["path"]`` its router and the routed forward, in place."""
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
    module.lte_config, module.lte_layer_index = config, index
    config._experts_implementation = IMPLEMENTATION
