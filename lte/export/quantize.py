"""``lte export --quantize int8|int4``: weight-only group quantization in compressed-tensors' format.

Every ``nn.Linear`` of the exported model (attention, FFN) is quantized the same way:
symmetric, one scale per group of 32 consecutive inputs of a row (llama.cpp's Q8_0/Q4_0 grouping:
8.5 and 4.5 bits per weight with fp16-exact scales), round to nearest. Each group's scale is searched
(:func:`fitted_scales`): of ``max|w| / qmax`` shrunk by a grid of clip factors, the one with the least
squared error, weighted per input by its mean squared activation on the calibration text where the
exporter has it (the clip search of AWQ and llama.cpp's k-quants; no second-order update as GPTQ's). The
checkpoint is written in
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

from lte_kernels.quant import GROUP_SIZE, QMAX, exact_scales, integers, quantized_activations

from ..core.errors import UsageError


@dataclasses.dataclass
class QuantPlan:
    """The Linear modules to quantize and those that stay float (with why), as module objects: the in-memory
    LTE model and the export it becomes hold the same modules under different names (:meth:`names`).
    :func:`fake_quantize_` fills ``scales``; :func:`compress_checkpoint` writes exactly those."""

    bits: int
    group_size: int
    modules: list[nn.Module]
    kept: dict[nn.Module, str]
    scales: dict[nn.Module, torch.Tensor] = dataclasses.field(default_factory=dict)

    def names(self, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """({name: module} to quantize, {name: why it stays float}) under ``model``'s module names."""
        planned, kept = {id(m) for m in self.modules}, {id(m): why for m, why in self.kept.items()}
        named = list(model.named_modules())
        return (
            {name: m for name, m in named if id(m) in planned},
            {name: kept[id(m)] for name, m in named if id(m) in kept},
        )

    def config(self, ignore: list[str]) -> dict:
        """config.json's ``quantization_config``, built by compressed-tensors' own schema."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=True, strategy="group", group_size=self.group_size
        )
        config = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            format="pack-quantized",
            quantization_status="compressed",
            ignore=sorted(ignore),
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
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module) in skip:
            continue
        if module.in_features % group_size:
            kept[module] = f"{module.in_features} inputs are not a multiple of the group size {group_size}"
        elif module is output:
            kept[module] = OUTPUT_EMBEDDINGS
        elif module not in modules:  # a module shared by two names is quantized once
            modules.append(module)
    if not modules:
        raise UsageError(
            f"--quantize {scheme}: this model has no nn.Linear layer (other than its output embeddings) whose input "
            f"width is a multiple of {group_size} (GPT-2-style Conv1D layers are not quantized); export without "
            f"--quantize"
        )
    return QuantPlan(int(scheme.removeprefix("int")), group_size, modules, kept)  # QUANT_SCHEMES: int8, int4


def dequantized(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = q.shape
    groups = scales.shape[1]
    return (q.float().reshape(rows, groups, -1) * scales.float().unsqueeze(-1)).reshape(rows, cols).to(dtype)


# Clip factors tried per group, from 1 (max|w| maps to qmax) down: int4 gains most (its 16 levels are coarse; a
# group's largest weight is often better clipped than spending a level on it), int8 keeps 1 almost everywhere.
CLIP_FACTORS = torch.linspace(1.0, 0.55, 31)
_CHUNK_ELEMENTS = 1 << 22  # rows searched at once: a few 16 MB fp32 temporaries


@torch.no_grad()
def fitted_scales(
    weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 [rows, cols / group_size]: per group, the scale (exact in fp16 and ``dtype``, as the kernels and
    the checkpoint hold it) of least ``sum(importance * (w - s * q(w / s))**2)`` over :data:`CLIP_FACTORS`.
    ``importance`` [cols]: each input's weight in the error (its mean squared activation, floored at 1e-6 of the
    largest); uniform if None, and in effect for a group whose inputs the calibration text never reaches.
    The search starts from ``max|w| / qmax`` and moves only to a strictly smaller error."""
    rows, cols = weight.shape
    groups = cols // group_size
    if importance is None:
        importance = torch.ones(cols)
    importance = importance.float().to(weight.device)
    importance = (importance / importance.max().clamp_min(1e-30)).clamp_min(1e-6)
    out = torch.empty(rows, groups, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        w = weight[start : start + step].detach().float()
        amax = w.reshape(-1, groups, group_size).abs().amax(dim=-1)
        best_error, best = None, None
        for factor in CLIP_FACTORS.tolist():  # the first factor is 1: max|w| / qmax
            scales = exact_scales(amax * (factor / QMAX[bits]), dtype)
            error = (w - dequantized(integers(w, scales, bits), scales, torch.float32)).square() * importance
            error = error.reshape(-1, groups, group_size).sum(dim=-1)
            if best is None:
                best_error, best = error, scales
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better, scales, best)
        out[start : start + step] = best
    return out


class PreHooks:
    """A forward pre-hook (``_hook``) on each of ``modules`` while the context is active."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def _hook(self, module, args):
        raise NotImplementedError

    def __enter__(self):
        self._handles = [module.register_forward_pre_hook(self._hook) for module in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


class InputImportance(PreHooks):
    """Each module's mean squared input per feature, gathered by forward pre-hooks while the caller runs the
    model on calibration text (``with InputImportance(modules) as importance: run()``)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__(modules)
        self.sums: dict[nn.Module, torch.Tensor] = {}
        self.counts: dict[nn.Module, int] = {}

    def _hook(self, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        self.sums[module] = self.sums.get(module, 0) + x.square().sum(dim=0)
        self.counts[module] = self.counts.get(module, 0) + x.shape[0]

    def of(self, module: nn.Module) -> torch.Tensor | None:
        return self.sums[module] / self.counts[module] if module in self.sums else None


class KernelActivations(PreHooks):
    """While active, each of ``modules`` sees its input as the CPU kernel multiplies it when decoding: rounded to
    int8 per block of 32 features, Q8_0-style (:func:`lte_kernels.quant.quantized_activations`). Under it,
    an evaluation measures what that rounding costs, and the in-memory model computes what the export decodes.
    Its pre-hooks run after any registered before them (an LTE layer's expert mask on the down projection)."""

    def _hook(self, module, args):
        x = args[0]
        return (quantized_activations(x).to(x.dtype), *args[1:])


@torch.no_grad()
def fake_quantize_(quant: QuantPlan, importance: InputImportance | None = None) -> None:
    """Replace each planned weight by its quantized-then-dequantized value, in place, and keep its scales
    (searched per group, weighted by ``importance`` where given)."""
    for module in quant.modules:
        weight = module.weight
        weights = importance.of(module) if importance is not None else None
        scales = fitted_scales(weight, quant.bits, quant.group_size, weight.dtype, weights)
        weight.copy_(dequantized(integers(weight, scales, quant.bits), scales, weight.dtype))
        quant.scales[module] = scales.to("cpu")  # the writer reads the saved files on the CPU


def compress_checkpoint(directory: Path, model: nn.Module, quant: QuantPlan) -> dict:
    """Rewrite ``directory``'s weight files in pack-quantized form and add ``quantization_config``: the
    integers and scales of :func:`fake_quantize_` (``model``: the exported model, whose module names the files
    use). Returns the bit counts for the export's report."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    modules, kept = quant.names(model)
    wanted = {f"{name}.weight": quant.scales[module] for name, module in modules.items()}
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    found, quantized_weights, float_weights, total_bytes = set(), 0, 0, 0
    for shard in shards:
        tensors = load_file(directory / shard)
        out = {}
        for key, tensor in tensors.items():
            if key not in wanted:
                out[key] = tensor
                if tensor.is_floating_point():
                    float_weights += tensor.numel()
                continue
            prefix, scales = key[: -len("weight")], wanted[key]
            out[prefix + "weight_packed"] = pack_to_int32(integers(tensor, scales, quant.bits), quant.bits)
            out[prefix + "weight_scale"] = scales.to(torch.float16)  # exact: fitted_scales rounds them so
            out[prefix + "weight_shape"] = torch.tensor(tensor.shape)
            found.add(key)
            quantized_weights += tensor.numel()
        save_file(out, directory / shard, metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in out.values())
        if index:
            for key in set(tensors) - set(out):
                del index["weight_map"][key]
            index["weight_map"].update(dict.fromkeys(set(out) - set(tensors), shard))
    missing = sorted(set(wanted) - found)
    if missing:
        raise UsageError(
            f"--quantize: {len(missing)} Linear weight(s) are not under their module's name in the saved checkpoint "
            f"({', '.join(missing[:3])}); this architecture renames its weights on save: export without --quantize"
        )
    if index:
        index.setdefault("metadata", {})["total_size"] = total_bytes
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quant.config(list(kept))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {
        "scheme": f"int{quant.bits}",
        "format": "compressed-tensors pack-quantized",
        "group_size": quant.group_size,
        "quantized_weights": quantized_weights,
        "float_weights": float_weights,
        "bits_per_quantized_weight": quant.bits + 16 / quant.group_size,  # one fp16 scale per group
        "kept_float": kept,
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
