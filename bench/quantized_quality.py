"""Held-out quality of quantized exports: one trained run exported at one sparsity as float, int8 and int4.

    python bench/quantized_quality.py runs/tiny --target-sparsity 0.5 --json bench/results/quantized_quality_tiny.json

Each row is `lte export RUN --target-sparsity S [--quantize int8|int4]` (thresholds tuned on that model, so the
sparsity matches), read back from its `lte_export.json`: held-out perplexity sparse and with every expert, in
the run's eval split and in the two other layouts (</s> doc, packed), on text the run never trained or
calibrated on. Exports are written to RUN/export-<row>-S and reused when there; ``--rows`` picks rows.

Two more pairs of rows swap the export's scale rule (``lte.export.quantize.fitted_scales``) for another, all else
equal (the same layers, groups of 32, tuning, evaluation): ``max-abs`` (``max|w| / qmax``, no search) and
``q8_0``/``q4_0``: the scales of llama.cpp's own Q8_0/Q4_0 quantizer (gguf-py's reference, ``gguf.quants``; Q4_0
signs its scale so the largest weight lands on -8), i.e. llama.cpp's rounding of the same weights. llama.cpp would
also quantize the token embeddings (not in these rows) and, in its matrix products, the activations (to Q8_0: the
``-a8`` rows below). ``gguf`` is a benchmark-only package (``pip install gguf``); without it those rows are left out.

``int8-a8``/``int4-a8`` measure what the CPU kernel's int8 activations cost (it rounds each quantized layer's
input to int8 per block of 32 when decoding, as llama.cpp does): the export's own scales, but from quantization on,
every quantized layer's input is rounded so in every forward of the export process (``KernelActivations``):
threshold tuning and the held-out figures are those of a model whose every token ran through the kernel. Its
reload check is skipped (the reloaded export rounds only when decoding, so its full sequences differ by design).
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

# Rows: {key: (name, --quantize scheme, change)}: change None is the export as it is (the searched scales).
ROWS = {
    "float": ("float", None, None),
    "int8": ("int8", "int8", None),
    "int4": ("int4", "int4", None),
    "int8-a8": ("int8 a8 (int8 activations)", "int8", "a8"),
    "int4-a8": ("int4 a8 (int8 activations)", "int4", "a8"),
    "int8-max-abs": ("int8 max-abs", "int8", "max_abs"),
    "int4-max-abs": ("int4 max-abs", "int4", "max_abs"),
    "q8_0": ("q8_0 (llama.cpp scales)", "int8", "gguf"),
    "q4_0": ("q4_0 (llama.cpp scales)", "int4", "gguf"),
}

_SCALE_RULE = "\nimport lte.export.quantize as q\nq.fitted_scales = rule\n"
# Run in the export's process before `lte export`: another scale rule for lte.export.quantize.fitted_scales, or
# int8 activations from quantization on.
CHANGES = {
    "a8": """
import lte.export.exporter as e
from lte.export.quantize import KernelActivations
quantize_in_memory = e.quantize_in_memory
def rounding_inputs(model, scheme, batches=None):
    quant = quantize_in_memory(model, scheme, batches)
    KernelActivations(quant.modules).__enter__()  # for the rest of the process
    return quant
e.quantize_in_memory = rounding_inputs
e.validate_export = lambda *args, **kwargs: float("nan")
""",
    "max_abs": """
from lte_kernels.quant import group_scales
def rule(weight, bits, group_size, dtype, importance=None):
    return group_scales(weight, bits, group_size, dtype)
"""
    + _SCALE_RULE,
    "gguf": """
import numpy as np, torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
def rule(weight, bits, group_size, dtype, importance=None):
    assert group_size == 32  # Q8_0 and Q4_0 blocks
    qtype = GGMLQuantizationType.Q8_0 if bits == 8 else GGMLQuantizationType.Q4_0
    rows, cols = weight.shape
    blocks = quantize(weight.detach().float().cpu().numpy(), qtype).reshape(rows, cols // 32, -1)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # each block starts with its fp16 scale
    return torch.from_numpy(d.astype(np.float32)).to(dtype).float().to(weight.device)
"""
    + _SCALE_RULE,
}


def export(run: Path, sparsity: float, name: str, scheme: str | None, change: str | None, options: list[str]):
    out = run / f"export-{name.split(' (')[0].replace(' ', '-')}-{sparsity:g}"
    argv = ["export", str(run), "--target-sparsity", str(sparsity), "--out", str(out), *options]
    argv += ["--quantize", scheme] if scheme else []
    settings = {"argv": argv, "scale_rule": change or "searched (lte.export.quantize.fitted_scales)"}
    if change == "a8":  # the searched scales, int8 activations
        settings = {"argv": argv, "scale_rule": "searched (lte.export.quantize.fitted_scales)", "activations": "int8"}
    made = out / "bench_settings.json"
    if (out / "lte_export.json").is_file() and (not made.is_file() or json.loads(made.read_text()) != settings):
        sys.exit(f"{out} was made with other settings than {settings} (or unknown ones): remove it to remake it")
    if not (out / "lte_export.json").is_file():
        code = CHANGES[change] if change else ""
        code += f"import sys\nfrom lte.cli import main\nsys.exit(main({argv!r}))"
        start = time.perf_counter()
        if subprocess.run([sys.executable, "-c", code]).returncode:
            sys.exit(f"failed: lte {' '.join(argv)} (change: {change or 'none'})")
        (out / "bench_export_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        made.write_text(json.dumps(settings, indent=2) + "\n")
    seconds = out / "bench_export_seconds.txt"
    return json.loads((out / "lte_export.json").read_text()), float(seconds.read_text()) if seconds.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--target-sparsity", type=float, default=0.5)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--allocation", help="lte export --allocation (default: the export's)")
    parser.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated (float first)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.rows.startswith("float"):
        sys.exit("--rows: float first (the other rows are compared with it)")
    rows = []
    for name, scheme, change in (ROWS[key] for key in args.rows.split(",")):
        if change == "gguf" and importlib.util.find_spec("gguf") is None:
            print(f"{name}: left out (pip install gguf for llama.cpp's scale rule)")
            continue
        options = ["--calibration-tokens", str(args.calibration_tokens)]
        options += ["--allocation", args.allocation] if args.allocation else []
        report, seconds = export(Path(args.run), args.target_sparsity, name, scheme, change, options)
        layouts = report.get("layouts") or {}
        quantization = report.get("quantization") or {}
        total = quantization.get("quantized_weights", 0) + quantization.get("float_weights", 0)
        rows.append(
            {
                "weights": name,
                "quantized_share": quantization["quantized_weights"] / total if total else 0.0,
                "heldout_sparsity": report["heldout_sparsity"],
                "sparse_ppl": report["sparse_ppl"],
                "dense_ppl": report["dense_ppl"],
                "layouts": layouts,
                "export_seconds": seconds,  # the whole `lte export` process, quantization and tuning included
            }
        )
    base = rows[0]
    lines = [
        (
            "| weights | share quantized | held-out sparsity | sparse ppl | vs float sparse | all experts ppl "
            "| vs float | export s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {100 * r['quantized_share']:.0f}% | {100 * r['heldout_sparsity']:.1f}% "
            f"| {r['sparse_ppl']:.4f} | {100 * (r['sparse_ppl'] / base['sparse_ppl'] - 1):+.2f}% "
            f"| {r['dense_ppl']:.4f} | {100 * (r['dense_ppl'] / base['dense_ppl'] - 1):+.2f}% "
            f"| {r['export_seconds'] or float('nan'):.0f} |"
        )
    print("\n".join(lines))
    print("\nother layouts (sparse ppl):")
    for r in rows:
        sparse = {name: values.get("sparse_ppl") for name, values in r["layouts"].items()}
        print(f"  {r['weights']}: " + ", ".join(f"{k} {v:.4f}" for k, v in sparse.items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
