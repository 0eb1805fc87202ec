"""Speed of an exported LTE checkpoint against the same checkpoint with every expert on.

    python bench/export_speed.py                       # TinyLlama-shaped layers (hidden 2048, FFN 5632), 4 of them
    python bench/export_speed.py --hidden 4096 --intermediate 11008 --layers 2 --sparsity 0.5

It builds a random Llama-architecture model of the given shape, MoEfies it, fits nothing
(centroid routers, thresholds set to the requested sparsity on random tokens: speed does not
depend on what the routers learned), exports it with the real exporter code, loads it back
with ``trust_remote_code=True`` and times, as medians over repeats in one process:

* prefill: one forward over ``--batch`` x ``--seq`` tokens (the masked path);
* decode: ``--new-tokens`` greedy tokens from a short prompt at batch 1 (the compact path,
  with the CPU kernel the export carries), via ``lte.tools.bench.bench_decode`` as ``lte bench decode``.

Ratios are sparse time / dense time of the same loaded model (``config.lte_routing``), so the
comparison is like for like. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

import lte_kernels.cpu as cpu_kernel
from lte.export.exporter import base_architecture, to_routed, write_checkpoint
from lte.export.thresholds import calibrate
from lte.model.inject import LTEModelConfig, inject_lte, set_lte_routing
from lte.tools.bench import bench_decode, median_seconds

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        vocab_size=32000,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    inject_lte(
        model, LTEModelConfig(expert_size=args.expert_size, router_init="centroid"), kmeans_iters=2, progress=False
    )
    set_lte_routing(model, "hard")
    tokens = torch.randint(0, config.vocab_size, (4, 128))
    thresholds = calibrate(model, [{"input_ids": tokens}], [args.sparsity] * args.layers, progress=False)
    base = base_architecture(model)
    to_routed(model, thresholds)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(model, tokenizer, Path(directory), base)
        del model
        exported = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    exported = exported.to(device).eval()

    prefill_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    prompt = torch.randint(0, config.vocab_size, (1, 8), device=device)

    @torch.no_grad()
    def prefill():
        exported(prefill_ids)

    prefill_s = {}
    for key, routing in (("dense", "dense"), ("sparse", "hard")):
        exported.config.lte_routing = routing
        prefill_s[key] = median_seconds(prefill, args.repeats, device)
    decode = bench_decode(exported, prompt, args.new_tokens, args.repeats, name="random Llama")
    result = {
        **asdict(decode),
        "args": vars(args),
        "cpu_kernel": cpu_kernel.available(),
        "dense_prefill_s": prefill_s["dense"],
        "sparse_prefill_s": prefill_s["sparse"],
        "prefill_time_ratio": prefill_s["sparse"] / prefill_s["dense"],
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"export_speed_{device.type}_h{args.hidden}_i{args.intermediate}_{args.dtype}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
