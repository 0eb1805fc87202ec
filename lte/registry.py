"""Which modules make up an FFN, per architecture, keyed by module class.

LTE needs three facts about an FFN: which projections produce the intermediate neurons
(their output features), which projection consumes them (its input features), and which
weight to cluster neurons on. Everything else (activation, dropout, GeGLU vs SwiGLU) stays
in the model's own forward, so a family is supported by one registry entry, not new code.

OPT has no MLP module: its fc1/fc2 sit directly on the decoder layer, so the "host" of its
FFN is the decoder layer itself. The mechanism is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FFNSpec:
    """Names, relative to the host module, of the FFN's projections.

    ``first``: projections whose *output* features are FFN neurons (gate and up). The
    router reads the input of ``first[0]``, which is the FFN input.
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


GATED = FFNSpec(first=("gate_proj", "up_proj"), down="down_proj", cluster_on="gate_proj")

# Host module class name -> spec. Names, not classes, so that importing this module does not
# import every model family, and so remote-code models with the same layout are covered.
FFN_REGISTRY: dict[str, FFNSpec] = {
    "LlamaMLP": GATED,
    "MistralMLP": GATED,
    "Qwen2MLP": GATED,
    "Qwen3MLP": GATED,
    "GemmaMLP": GATED,
    "Gemma2MLP": GATED,
    "Gemma3MLP": GATED,
    "Phi3MLP": FFNSpec(first=("gate_up_proj",), down="down_proj", cluster_on="gate_up_proj", fused_chunks=2),
    "GPT2MLP": FFNSpec(first=("c_fc",), down="c_proj", cluster_on="c_fc"),
    "GPTNeoXMLP": FFNSpec(first=("dense_h_to_4h",), down="dense_4h_to_h", cluster_on="dense_h_to_4h"),
    "OPTDecoderLayer": FFNSpec(first=("fc1",), down="fc2", cluster_on="fc1"),
}


def register_ffn(host_class_name: str, spec: FFNSpec) -> None:
    """Teach LTE a new FFN layout (for a custom or remote-code architecture)."""
    FFN_REGISTRY[host_class_name] = spec


def spec_for(module: nn.Module) -> FFNSpec | None:
    return FFN_REGISTRY.get(type(module).__name__)


# Weight layouts: (axis of output features, axis of input features) in ``weight``.
# nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
_LAYOUTS = {"Linear": (0, 1), "Conv1D": (1, 0)}


def feature_axes(projection: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of ``projection.weight``."""
    for klass in type(projection).__mro__:
        if klass.__name__ in _LAYOUTS:
            return _LAYOUTS[klass.__name__]
    raise TypeError(f"unsupported projection type {type(projection).__name__}: expected nn.Linear or Conv1D")


def weight_shape(projection: nn.Module) -> tuple[int, ...]:
    """``projection.weight``'s logical shape, also when ZeRO-3 has partitioned it (``ds_shape``)
    or bitsandbytes has packed it into 4-bit storage (``quant_state.shape``)."""
    weight = projection.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        return tuple(quant_state.shape)
    return tuple(getattr(weight, "ds_shape", weight.shape))
