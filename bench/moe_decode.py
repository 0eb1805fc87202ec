"""An MoE export decoding end to end (batch 1, CPU) against the base model in transformers, same weights.

    python bench/moe_decode.py --json bench/results/moe_decode_cpu_float32_fused.json
    python bench/moe_decode.py --dtype bfloat16 --json bench/results/moe_decode_cpu_bfloat16_fused.json

A random Qwen3-MoE model with Qwen3-30B-A3B's layer shapes (hidden 2048, experts of 768 neurons, top-8,
32 query / 4 key-value heads of 128) but ``--layers`` layers, ``--experts`` experts per layer and a
``--vocab``-token vocabulary, so that it fits this machine; a token reads the same expert bytes per layer as
in the full model (top-8 of any number of experts). LTE is injected (centroid routers, groups of
``--group`` neurons), thresholds are calibrated per layer for each ``--sparsity`` on random tokens (speed
does not depend on what the routers learned), and the model is exported once with the real exporter.

Timed in one process, medians over ``--repeats`` greedy generations of ``--new-tokens`` tokens:

* **dense baselines**: the export loaded with its base class (no remote code: what a user without this
  project runs), once per transformers experts implementation (``eager``, ``batched_mm``, ``grouped_mm``);
  the ratio is against the fastest;
* **LTE**: the export loaded with ``trust_remote_code=True`` (the routed experts on the CPU kernel), at each
  sparsity (``config.lte_thresholds`` set to that sparsity's calibrated thresholds), and with every group
  (``lte_routing="dense"``).

The sparsity printed is what the routed experts skipped while decoding (counted by the export itself).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch
import transformers

import lte_kernels.cpu as cpu_kernel
from lte.export.exporter import base_architecture, to_routed, write_checkpoint
from lte.export.thresholds import calibrate
from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing
from lte.tools.bench import machine, median_seconds, run_counting_skips

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("eager", "batched_mm", "grouped_mm")


def build_export(args, directory: Path) -> dict[float, list[float]]:
    """Write the LTE export of a random model to ``directory``; returns each sparsity's thresholds."""
    config = transformers.Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.width,
        intermediate_size=args.width,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=args.vocab,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    inject_lte(model, LTEModelConfig(expert_size=args.group, router_init="centroid"), kmeans_iters=2, progress=False)
    set_lte_routing(model, "hard")
    batches = [{"input_ids": torch.randint(0, args.vocab, (4, 128), generator=torch.Generator().manual_seed(1))}]
    layers = len(lte_layers(model))
    thresholds = {s: calibrate(model, batches, [s] * layers, progress=False) for s in args.sparsities}
    base = base_architecture(model)
    to_routed(model, thresholds[args.sparsities[0]])
    model.to(getattr(torch, args.dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    write_checkpoint(model, tokenizer, directory, base)
    return thresholds


def generate(model, prompt: torch.Tensor, args) -> None:
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, **kwargs)


def decode_seconds(model, prompt: torch.Tensor, args) -> float:
    return median_seconds(lambda: generate(model, prompt, args), args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--sparsity", default="0.5,0.9")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.sparsities = [float(s) for s in args.sparsity.split(",")]
    dtype = getattr(torch, args.dtype)
    prompt = torch.randint(3, args.vocab, (1, 8), generator=torch.Generator().manual_seed(2))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        thresholds = build_export(args, directory)
        gc.collect()
        for implementation in BASELINES:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, experts_implementation=implementation
            ).eval()
            assert type(model).__module__.startswith("transformers."), "the baseline must not run remote code"
            seconds = decode_seconds(model, prompt, args)
            rows.append({"method": f"base class, {implementation}", "tokens_per_s": args.new_tokens / seconds})
            print(rows[-1], flush=True)
            del model
            gc.collect()
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=True)
        model.eval()
        model.config.lte_routing = "dense"
        seconds = decode_seconds(model, prompt, args)
        rows.append({"method": "LTE export, every group", "tokens_per_s": args.new_tokens / seconds})
        print(rows[-1], flush=True)
        model.config.lte_routing = "hard"
        for sparsity in args.sparsities:
            model.config.lte_thresholds = thresholds[sparsity]
            seconds = decode_seconds(model, prompt, args)
            _, skipped = run_counting_skips(model, lambda: generate(model, prompt, args))
            rows.append(
                {
                    "method": f"LTE export, {sparsity:.0%} calibrated",
                    "tokens_per_s": args.new_tokens / seconds,
                    "decode_sparsity": sum(skipped) / len(skipped),
                }
            )
            print(rows[-1], flush=True)
    best = max((r for r in rows if r["method"].startswith("base class")), key=lambda r: r["tokens_per_s"])
    for row in rows:
        row["vs_best_dense"] = row["tokens_per_s"] / best["tokens_per_s"]
    print(f"{machine()}, {args.dtype}, batch 1, {args.new_tokens} new tokens, median of {args.repeats}:")
    for row in rows:
        extra = f", {100 * row['decode_sparsity']:.1f}% skipped" if "decode_sparsity" in row else ""
        print(f"  {row['method']:<32} {row['tokens_per_s']:7.2f} tokens/s  {row['vs_best_dense']:.2f}x{extra}")
    result = {"device": machine(), "cpu_kernel": cpu_kernel.available(), "args": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
