"""Issue 29's router choice, measured: one router per layer scoring every (expert, group) against one per
(layer, expert) scoring only the selected experts' groups. Same parameters, same scores for the selected
experts; Mixtral-like shapes, one token, one thread, medians of 30.

    python bench/moe_router_choice.py
"""

import time

import torch
from torch.nn import functional as F

HIDDEN, WIDTH, EXPERTS, SELECTED, GROUP = 4096, 14336, 8, (3, 6), 32


def main() -> None:
    torch.set_num_threads(1)
    groups = WIDTH // GROUP
    weight = torch.randn(EXPERTS, groups, HIDDEN) * 0.01
    x = torch.randn(1, HIDDEN)

    def every():  # one router per layer: every (expert, group) scored, the selected rows kept
        return torch.sigmoid(F.linear(x, weight.view(EXPERTS * groups, HIDDEN))).view(EXPERTS, groups)[list(SELECTED)]

    def per_expert():  # one router per (layer, expert): only the selected experts' groups
        return torch.stack([torch.sigmoid(F.linear(x, weight[e]))[0] for e in SELECTED])

    assert torch.allclose(every(), per_expert(), atol=1e-5)
    for fn in (every, per_expert):
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{fn.__name__}: median {1e3 * times[len(times) // 2]:.3f} ms")


if __name__ == "__main__":
    main()
