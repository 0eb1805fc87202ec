"""Where a CPU training step of the embedded model goes, for two block shapes with the same tokens.

    python bench/step_profile.py [--model assets/stories260K] [--steps 5]

One forward + backward of the causal-LM loss (as stage 2 runs it, without the teacher), profiled with
``torch.profiler``: the wall time per step (median) and the share of the profiled CPU time spent in
scaled-dot-product attention. With stories260K's 8-dimensional heads, SDPA's CPU kernel dominates, and
its cost per token grows with the block length: why the ``tiny`` recipe trains on 128-token blocks and
evaluates on 256-token ones (``data.eval_block_size``).
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/stories260K")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").train()
    vocab = model.config.vocab_size
    print(f"{args.model}, {torch.get_num_threads()} threads")
    for batch, block in ((8, 256), (16, 128)):
        ids = torch.randint(3, vocab, (batch, block), generator=torch.Generator().manual_seed(0))

        def step(ids=ids):
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        print(
            f"  {batch:2d} x {block}: {1000 * statistics.median(times):.0f} ms per forward + backward, "
            f"attention {100 * attention / total:.0f}% of it"
        )


if __name__ == "__main__":
    main()
