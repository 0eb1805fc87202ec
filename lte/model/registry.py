"""What makes up an FFN: the :class:`FFNSpec` of one host module, and how layouts are stored.

LTE needs three facts about an FFN: which projections produce the intermediate neurons
(their output features), which projection consumes them (its input features), and which
weight to cluster neurons on. Everything else (activation, dropout, GeGLU vs SwiGLU) stays
in the model's own forward.

The layout of a model is found by :mod:`lte.model.detect` from its module tree and one traced
forward; this module holds the overrides for what detection cannot settle (a Python
:func:`register_ffn` per host class, or the recipe key ``model.ffn_layout``) and the
serialised form saved with every run (``lte_config.json``) and export (``config.lte_ffn``).
The host of an FFN is the module whose direct children are its projections: an MLP module
(``model.layers.0.mlp``), or the decoder layer itself where the FFN has no module (OPT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FFNSpec:
    """Names, relative to the host module, of the FFN's projections.

    ``first``: projections whose *output* features are FFN neurons (gate and up), in the
    order the forward calls them; ``first[0]`` runs first and its input is the FFN input,
    which the router reads.
    ``down``: the projection whose *input* features are FFN neurons.
    ``cluster_on``: the projection whose neuron rows are clustered into experts (the gate
    for gated FFNs, as LTE/MoEfication do; the input projection otherwise).
    ``fused_chunks``: how many neuron blocks a fused first projection stacks (Phi-3's
    ``gate_up_proj`` holds gate then up, so 2); the first chunk is the gate.
    """

    first: tuple[str, ...]
    down: str
    cluster_on: str
    fused_chunks: int = 1

    def to_dict(self) -> dict:
        return {**asdict(self), "first": list(self.first)}

    @classmethod
    def from_dict(cls, data) -> FFNSpec:
        """From a saved layout or a recipe's ``model.ffn_layout`` (``cluster_on`` defaults to ``first[0]``)."""
        data = dict(data)
        first = data.get("first")
        first = (first,) if isinstance(first, str) else tuple(first or ())
        if not first or not data.get("down"):
            raise ValueError(f"an FFN layout needs 'first' (a list of projection names) and 'down', got {data}")
        unknown = set(data) - {"first", "down", "cluster_on", "fused_chunks", "path"}
        if unknown:
            raise ValueError(f"unknown FFN layout keys {sorted(unknown)}; valid: first, down, cluster_on, fused_chunks")
        return cls(
            first=first,
            down=str(data["down"]),
            cluster_on=str(data.get("cluster_on") or first[0]),
            fused_chunks=int(data.get("fused_chunks", 1)),
        )


# Overrides: host module class name -> spec. Empty by default: every architecture goes through
# structural detection. Names, not classes, so remote-code models can be covered too.
FFN_REGISTRY: dict[str, FFNSpec] = {}


def register_ffn(host_class_name: str, spec: FFNSpec) -> None:
    """Override detection for one host class (a custom or remote-code architecture). The layout is
    still proven on a traced forward before use, and saved with the run."""
    FFN_REGISTRY[host_class_name] = spec


def spec_for(module: nn.Module) -> FFNSpec | None:
    """The registered override for ``module``'s class, if any."""
    return FFN_REGISTRY.get(type(module).__name__)


def layout_to_list(layout: dict[str, FFNSpec]) -> list[dict]:
    """``{path: spec}`` -> ``[{"path": ..., "first": [...], "down": ..., ...}]`` (JSON, depth order)."""
    return [{"path": path, **spec.to_dict()} for path, spec in layout.items()]


def layout_from_list(entries: list[dict]) -> dict[str, FFNSpec]:
    return {entry["path"]: FFNSpec.from_dict(entry) for entry in entries}


# Weight layouts: (axis of output features, axis of input features) in ``weight``.
# nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
_LAYOUTS = {"Linear": (0, 1), "Conv1D": (1, 0)}


def base_projection(module: nn.Module) -> nn.Module | None:
    """The nn.Linear / Conv1D inside ``module`` (itself, or under PEFT's ``base_layer`` wrappers);
    None when ``module`` is no projection. bitsandbytes' Linear4bit/8bitLt subclass nn.Linear."""
    seen = 0
    while module is not None and seen < 8:
        if any(klass.__name__ in _LAYOUTS for klass in type(module).__mro__):
            return module
        module = module._modules.get("base_layer") if isinstance(module, nn.Module) else None
        seen += 1
    return None


def feature_axes(projection: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of ``projection.weight``."""
    base = base_projection(projection)
    if base is None:
        raise TypeError(f"unsupported projection type {type(projection).__name__}: expected nn.Linear or Conv1D")
    for klass in type(base).__mro__:
        if klass.__name__ in _LAYOUTS:
            return _LAYOUTS[klass.__name__]
    raise AssertionError("unreachable")


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s shape, also when ZeRO-3 has partitioned it (``ds_shape``; the local tensor is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def weight_shape(projection: nn.Module) -> tuple[int, ...]:
    """``projection.weight``'s logical shape, also when ZeRO-3 has partitioned it (``ds_shape``)
    or bitsandbytes has packed it into 4-bit storage (``quant_state.shape``)."""
    weight = (base_projection(projection) or projection).weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        return tuple(quant_state.shape)
    return logical_shape(weight)


def in_out(projection: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a projection."""
    shape = weight_shape(projection)
    out_axis, in_axis = feature_axes(projection)
    return shape[in_axis], shape[out_axis]
