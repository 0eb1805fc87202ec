"""``lte export --quantize int8|int4``: weight-only group quantization in compressed-tensors' format.

Every ``nn.Linear`` of the exported model (attention, FFN) is quantized the same way:
symmetric, one scale per group of 32 consecutive inputs of a row (llama.cpp's Q8_0/Q4_0 grouping:
8.5 and 4.5 bits per weight with fp16-exact scales), round to nearest. The checkpoint is written in
**compressed-tensors**' ``pack-quantized`` format (``weight_packed`` int32 words, ``weight_scale``,
``weight_shape``; ``quantization_config`` in config.json), which transformers (with the
``compressed-tensors`` package) and vLLM read, so the base class still loads it, dense. Why this
format, and what else was weighed: docs/quantization.md.

Kept in float, and listed in the config's ``ignore``: a Linear whose input width is not a multiple
of the group (compressed-tensors requires whole groups), and the output embeddings (``lm_head``: vLLM
loads them only unquantized). The routers stay in ``lte/routers.safetensors``.

The exporter quantizes the model in memory first (:func:`fake_quantize_`: each weight replaced by its
dequantized value), so thresholds are tuned, perplexity measured and the reload checked on the
quantized model: the same weights every loader computes with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UsageError

SCHEMES = {"int8": 8, "int4": 4}  # lte.training.export_args.QUANT_SCHEMES
GROUP_SIZE = 32
PACKAGE = "compressed-tensors"


def require_package() -> None:
    """Refuse before any work when the format's library is missing (checked by the request)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--quantize writes the {PACKAGE} format and needs its package: pip install {PACKAGE} "
            f"(or pip install 'lte[quant]')"
        ) from None


@dataclasses.dataclass
class QuantPlan:
    """Which Linear modules are quantized (by module name) and which stay float, with why."""

    bits: int
    group_size: int
    modules: list[str]
    kept: dict[str, str]

    def config(self) -> dict:
        """config.json's ``quantization_config``, built by compressed-tensors' own schema."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=True, strategy="group", group_size=self.group_size
        )
        config = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            format="pack-quantized",
            quantization_status="compressed",
            ignore=sorted(self.kept),
        )
        return {"quant_method": "compressed-tensors", **config.model_dump(exclude={"quant_method"}, mode="json")}


# Why the output embeddings stay float: vLLM's ParallelLMHead loads only an unquantized weight (tried: "no
# parameter named 'lm_head.weight_packed'"), and a tied one is the input embeddings.
OUTPUT_EMBEDDINGS = "the output embeddings (vLLM loads them only unquantized; llm-compressor keeps them so too)"


def plan(model: nn.Module, scheme: str, group_size: int = GROUP_SIZE, skip=()) -> QuantPlan:
    """The plan for ``model``: its ``nn.Linear`` modules (an export's routed projections are subclasses)
    but those in ``skip`` (the in-memory LTE model's routers)."""
    modules, kept, skip = [], {}, {id(module) for module in skip}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in skip:
            continue
        if module.in_features % group_size:
            kept[name] = f"{module.in_features} inputs are not a multiple of the group size {group_size}"
        elif module is output:
            kept[name] = OUTPUT_EMBEDDINGS
        else:
            modules.append(name)
    if not modules:
        raise UsageError(
            f"--quantize {scheme}: no Linear layer of this model has an input width that is a multiple of "
            f"{group_size}; export without --quantize"
        )
    return QuantPlan(SCHEMES[scheme], group_size, modules, kept)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, cols], scales [rows, cols / group_size] in ``weight``'s dtype) for a [rows, cols]
    weight: ``s = max|w| / (2**(bits-1) - 1)`` rounded to a value fp16 and the weight's dtype both hold
    exactly (the CPU kernel reads fp16 scales), ``q = round(w / s)``."""
    qmax = 2 ** (bits - 1) - 1
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)
    scales = (w.abs().amax(dim=-1) / qmax).to(torch.float16).to(weight.dtype).float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    q = (w / safe).round().clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(rows, cols), scales.to(weight.dtype)


def dequantized(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = q.shape
    groups = scales.shape[1]
    return (q.float().reshape(rows, groups, -1) * scales.float().unsqueeze(-1)).reshape(rows, cols).to(dtype)


@torch.no_grad()
def fake_quantize_(model: nn.Module, quant: QuantPlan) -> None:
    """Replace each planned weight by its quantized-then-dequantized value, in place."""
    for name in quant.modules:
        weight = model.get_submodule(name).weight
        q, scales = quantize_weight(weight, quant.bits, quant.group_size)
        weight.copy_(dequantized(q, scales, weight.dtype))


def compress_checkpoint(directory: Path, quant: QuantPlan) -> dict:
    """Rewrite ``directory``'s weight files in pack-quantized form and add ``quantization_config``.
    The weights there are already quantized values (:func:`fake_quantize_`), so this is lossless.
    Returns the bit counts for the export's report."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    wanted = {f"{name}.weight" for name in quant.modules}
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    found, quantized_weights, float_weights = set(), 0, 0
    for shard in shards:
        tensors = load_file(directory / shard)
        out = {}
        for key, tensor in tensors.items():
            if key not in wanted:
                out[key] = tensor
                if tensor.is_floating_point():
                    float_weights += tensor.numel()
                continue
            prefix = key[: -len("weight")]
            q, scales = quantize_weight(tensor, quant.bits, quant.group_size)
            out[prefix + "weight_packed"] = pack_to_int32(q, quant.bits)
            out[prefix + "weight_scale"] = scales.to(torch.float16)  # exact: quantize_weight rounds them so
            out[prefix + "weight_shape"] = torch.tensor(tensor.shape)
            found.add(key)
            quantized_weights += tensor.numel()
        save_file(out, directory / shard, metadata={"format": "pt"})
        if index:
            for key in set(tensors) - set(out):
                del index["weight_map"][key]
            index["weight_map"].update(dict.fromkeys(set(out) - set(tensors), shard))
    missing = sorted(wanted - found)
    if missing:
        raise UsageError(
            f"--quantize: {len(missing)} Linear weight(s) are not under their module's name in the saved checkpoint "
            f"({', '.join(missing[:3])}); this architecture renames its weights on save: export without --quantize"
        )
    if index:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quant.config()
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    stored = quant.bits + 16 / quant.group_size  # one fp16 scale per group
    return {
        "scheme": f"int{quant.bits}",
        "format": "compressed-tensors pack-quantized",
        "group_size": quant.group_size,
        "quantized_weights": quantized_weights,
        "float_weights": float_weights,
        "bits_per_quantized_weight": stored,
        "kept_float": quant.kept,
    }


def describe_quantization(report: dict) -> str:
    """One line for the export's summary: the scheme, what share of the weights it covers, what stayed float."""
    total = report["quantized_weights"] + report["float_weights"]
    reasons: dict[str, list[str]] = {}
    for name, reason in report["kept_float"].items():
        reasons.setdefault(reason, []).append(name)
    kept = "; ".join(
        f"{len(names)} Linear layer{'s' * (len(names) > 1)} ({names[0]}{', ...' * (len(names) > 1)}): {reason}"
        for reason, names in reasons.items()
    )
    return (
        f"{report['scheme']} (groups of {report['group_size']}, {report['bits_per_quantized_weight']:.1f} bits) for "
        f"{100 * report['quantized_weights'] / max(total, 1):.0f}% of the weights; the rest in float (embeddings, "
        f"norms{'; ' + kept if kept else ''})"
    )
