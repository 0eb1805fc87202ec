"""Held-out quality of quantized exports: one trained run exported at one sparsity as float, int8 and int4.

    python bench/quantized_quality.py runs/tiny --target-sparsity 0.5 --json bench/results/quantized_quality_tiny.json

Each row is `lte export RUN --target-sparsity S [--quantize int8|int4]` (thresholds tuned on that model, so the
sparsity matches), read back from its `lte_export.json`: held-out perplexity sparse and with every expert, in
the run's eval split and in the two other layouts (</s> doc, packed), on text the run never trained or
calibrated on. Exports are written to RUN/export-{float,int8,int4}-S and reused when there.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def export(run: Path, sparsity: float, scheme: str | None, calibration_tokens: int) -> dict:
    out = run / f"export-{scheme or 'float'}-{sparsity:g}"
    if not (out / "lte_export.json").is_file():
        command = [
            sys.executable,
            "-m",
            "lte",
            "export",
            str(run),
            "--target-sparsity",
            str(sparsity),
            "--out",
            str(out),
        ]
        command += ["--calibration-tokens", str(calibration_tokens), *(["--quantize", scheme] if scheme else [])]
        if subprocess.run(command).returncode:
            sys.exit(f"failed: {' '.join(command)}")
    return json.loads((out / "lte_export.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--target-sparsity", type=float, default=0.5)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for scheme in (None, "int8", "int4"):
        report = export(Path(args.run), args.target_sparsity, scheme, args.calibration_tokens)
        layouts = report.get("layouts") or {}
        quantization = report.get("quantization") or {}
        total = quantization.get("quantized_weights", 0) + quantization.get("float_weights", 0)
        rows.append(
            {
                "weights": scheme or "float",
                "quantized_share": quantization["quantized_weights"] / total if total else 0.0,
                "heldout_sparsity": report["heldout_sparsity"],
                "sparse_ppl": report["sparse_ppl"],
                "dense_ppl": report["dense_ppl"],
                "layouts": layouts,
            }
        )
    base = rows[0]
    lines = [
        "| weights | share quantized | held-out sparsity | sparse ppl | vs float sparse | all experts ppl | vs float |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {100 * r['quantized_share']:.0f}% | {100 * r['heldout_sparsity']:.1f}% "
            f"| {r['sparse_ppl']:.4f} | {100 * (r['sparse_ppl'] / base['sparse_ppl'] - 1):+.2f}% "
            f"| {r['dense_ppl']:.4f} | {100 * (r['dense_ppl'] / base['dense_ppl'] - 1):+.2f}% |"
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
