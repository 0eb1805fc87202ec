"""How long expert grouping takes at Llama-2-7B FFN shapes (11008 neurons x 4096, 344 experts).

    python bench/moefication_speed.py [--layers 32] [--iters 10]

Random weights stand in for the gate rows: the time depends only on the shapes.
"""

import argparse
import statistics
import time

import torch

from lte.model.grouping import balanced_kmeans


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="layers to time (Llama-2-7B has 32)")
    parser.add_argument("--neurons", type=int, default=11008)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    times = []
    for layer in range(args.layers):
        rows = torch.randn(args.neurons, args.d_model, generator=torch.Generator().manual_seed(layer))
        start = time.perf_counter()
        labels = balanced_kmeans(rows, args.neurons // args.expert_size, iters=args.iters, seed=layer)
        times.append(time.perf_counter() - start)
        assert torch.bincount(labels).eq(args.expert_size).all()
    per_layer = statistics.median(times)
    print(
        f"threads={torch.get_num_threads()} shape={args.neurons}x{args.d_model} "
        f"experts={args.neurons // args.expert_size} "
        f"median {per_layer:.2f} s/layer -> {32 * per_layer:.0f} s for 32 layers"
    )


if __name__ == "__main__":
    main()
