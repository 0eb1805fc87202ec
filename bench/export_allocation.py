"""Tuned vs uniform per-layer sparsity allocation: held-out sparsity and perplexity per target.

    python bench/export_allocation.py runs/tiny                  # the demo's run
    python bench/export_allocation.py runs/tiny --targets 0.3 0.5 0.7 0.9 --calibration-tokens 32768

For each target it tunes thresholds exactly as `lte export` does (same calibration tokens,
same code), once with the tuned allocation and once with the uniform one, and measures the
held-out split the calibration never reads. Writes a Markdown table, JSON and a
sparsity/perplexity plot to bench/results/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lte.core.run_dir import stage2_model
from lte.export.thresholds import KEEP_ALL, allocate, evaluate_allocation, sensitivity, set_thresholds
from lte.model.inject import load_lte, lte_layers
from lte.training.config import load_run_recipe
from lte.training.data import build_data
from lte.training.evaluate import evaluate_lm
from lte.training.loading import calibration_batches, collator_for, load_report, load_tokenizer, model_kwargs

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--name", default=None, help="results file stem (default: export_allocation_<run name>)")
    args = parser.parse_args()

    recipe = load_run_recipe(args.run_dir)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    batch = recipe.train.get("per_device_eval_batch_size", 8)
    batches = calibration_batches(data, tokenizer, args.calibration_tokens, batch)
    collator = collator_for(data, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_lte(stage2_model(args.run_dir), **model_kwargs(recipe)).to(device).eval()
    n = len(lte_layers(model))

    set_thresholds(model, [KEEP_ALL] * n)
    dense = evaluate_lm(model, data.eval, collator, batch, desc="Held-out, all experts")
    set_thresholds(model, [recipe.lte.threshold] * n)  # the trained operating point
    trained = evaluate_lm(model, data.eval, collator, batch, desc="Held-out, trained thresholds")
    sens = sensitivity(model, batches)
    rows = []
    for target in tqdm(args.targets, desc="Targets"):
        for allocation, layer_targets in (("uniform", [target] * n), ("tuned", allocate(sens, target))):
            set_thresholds(model, [recipe.lte.threshold] * n)
            calibrated = evaluate_allocation(model, batches, allocation, layer_targets, progress=False)
            held_out = evaluate_lm(model, data.eval, collator, batch, desc=f"Held-out, {allocation} {target}")
            rows.append(
                {
                    "target": target,
                    "allocation": allocation,
                    "layer_targets": layer_targets,
                    "calibration_sparsity": calibrated.sparsity,
                    "calibration_ppl": calibrated.ppl,
                    "heldout_sparsity": held_out.sparsity,
                    "heldout_ppl": held_out.ppl,
                    "heldout_per_layer_sparsity": held_out.per_layer_sparsity,
                }
            )

    original = load_report(args.run_dir).get("dense_ppl")
    name = args.name or f"export_allocation_{recipe.name}"
    RESULTS.mkdir(exist_ok=True)
    result = {
        "run_dir": str(args.run_dir),
        "calibration_tokens": args.calibration_tokens,
        "heldout_tokens": dense.tokens,
        "original_ppl": original,
        "dense_ppl": dense.ppl,
        "trained_ppl": trained.ppl,
        "trained_sparsity": trained.sparsity,
        "sensitivity_grid": sens.grid,
        "sensitivity": sens.costs.tolist(),
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        (
            f"Held-out ppl of the original model: {original:.4f}; "
            f"of the stage-2 model with every expert: {dense.ppl:.4f}, "
            f"at its trained thresholds (lte.threshold): {trained.ppl:.4f} "
            f"at {100 * trained.sparsity:.1f}% sparsity ({dense.tokens} held-out tokens; calibration: "
            f"{args.calibration_tokens} training tokens)."
        ),
        "",
        (
            "| target | allocation | per-layer sparsity | calibration ppl | held-out sparsity | held-out ppl "
            "| vs original |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_layer = " ".join(f"{100 * s:.0f}" for s in r["layer_targets"])
        lines.append(
            f"| {r['target']:.1f} | {r['allocation']} | {per_layer} | {r['calibration_ppl']:.4f} | "
            f"{100 * r['heldout_sparsity']:.1f}% | {r['heldout_ppl']:.4f} | "
            f"{100 * (r['heldout_ppl'] / original - 1):+.1f}% |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, dense.ppl, (trained.sparsity, trained.ppl), RESULTS / f"{name}.png")
    print("\n".join(lines))


def plot(rows, dense_ppl: float, trained: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for allocation, style in (("uniform", "o--"), ("tuned", "s-")):
        points = [(100 * r["heldout_sparsity"], r["heldout_ppl"]) for r in rows if r["allocation"] == allocation]
        ax.plot(*zip(*points, strict=True), style, label=f"{allocation} allocation")
    ax.axhline(dense_ppl, color="tab:gray", linestyle=":", label="all experts")
    ax.plot([100 * trained[0]], [trained[1]], "k*", markersize=10, label="trained thresholds")
    ax.set(xlabel="held-out FFN sparsity (%)", ylabel="held-out perplexity", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
