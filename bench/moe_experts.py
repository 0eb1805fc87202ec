"""One MoE layer's routed experts at decode (one token), the export's code against transformers' own.

Qwen3-30B-A3B's shapes by default (hidden 2048, 128 experts of 768 neurons, top-8), random weights, groups
of 32 neurons. Dense baselines: transformers' experts implementations (``eager``, ``batched_mm``,
``grouped_mm``); the ratio is against the fastest of them in the same run. LTE: the export's
``lte_routed`` forward (lte/export/remote/experts.py) with the project's CPU kernel bound as an export
binds its copy, at 0/50/70/90% of each selected expert's groups skipped (thresholds on random router
scores). Medians over ``--repeats`` calls, each with its own random top-k experts (the same for every
method), so the experts' weights come from memory, not the cache.

    python bench/moe_experts.py --repeats 30 --dtype float32,bfloat16 --threads 1 \
        --json bench/results/moe_experts_cpu_1thread.json
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import lte_kernels.cpu as cpu
from lte.export.remote import experts as remote, modeling_lte as modeling

BASELINES = ("eager", "batched_mm", "grouped_mm")


def build(args, dtype):
    config = transformers.Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.width, num_experts=args.experts, hidden_act="silu"
    )
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.02)
        module.down_proj.normal_(0, 0.02)
    module = module.to(dtype)
    config.lte_ffn, config.lte_routing, config.lte_thresholds = {"expert_size": args.group}, "hard", [0.0]
    config.lte_track_sparsity = False
    holder = torch.nn.Module()
    holder.experts = module
    remote.install_routed_experts(holder, config, 0, {"path": "experts"}, modeling._kernels, modeling.SkipCounter())
    assert remote.kernels(module) is not None, "the routed experts would run the masked path, not the kernel"
    with torch.no_grad():  # scores that do not depend on the token: a threshold per target sparsity
        module.lte_router.weight.zero_()
        module.lte_router.bias = torch.nn.Parameter(torch.randn(args.experts, args.width // args.group).to(dtype))
    return module, config


def timed(fn, calls, warmup=3):
    for call in calls[:warmup]:
        fn(*call)
    times = []
    for call in calls:
        start = time.perf_counter()
        fn(*call)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--sparsity", default="0,0.5,0.7,0.9")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu.available(), "the CPU kernel did not build"
    # what the export's copies bind from lte_kernels_cpu.py: modeling_lte chooses the kernels, the experts use them
    remote._cpu_kernel_available = modeling._cpu_kernel_available = cpu.available
    modeling._cpu_select, modeling._cpu_matvec, modeling._cpu_matvec_t = (
        cpu.select_experts,
        cpu.slot_matvec,
        cpu.slot_matvec_t,
    )
    remote._cpu_dense_matmul_t = cpu.dense_matmul_t
    rows = []
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        module, config = build(args, dtype)
        generator = torch.Generator().manual_seed(1)
        calls = [
            (
                torch.randn(1, args.hidden, generator=generator).to(dtype),
                torch.randperm(args.experts, generator=generator)[: args.top_k].view(1, -1),
                torch.full((1, args.top_k), 1.0 / args.top_k, dtype=dtype),
            )
            for _ in range(args.repeats)
        ]
        with torch.no_grad():
            dense = {}
            for impl in BASELINES:
                config._experts_implementation = impl
                dense[impl] = timed(module, calls)
            best = min(dense, key=dense.get)
            remote.relayout_experts(module)  # what the export's from_pretrained does (after the base layout's timings)
            assert remote._in_kernel_layout(module), "the experts' rows are not in the kernel's layout"
            config._experts_implementation = remote.IMPLEMENTATION
            scores = torch.sigmoid(module.lte_router.bias.float()).flatten()
            for sparsity in map(float, args.sparsity.split(",")):
                config.lte_thresholds = [-1.0 if sparsity == 0 else float(torch.quantile(scores, sparsity))]
                sparse_ms = timed(module, calls)
                config.lte_routing = "dense"  # the same forward, every group: the masked path
                masked_ms = timed(module, calls)
                config.lte_routing = "hard"
                row = {
                    "dtype": name,
                    "sparsity": sparsity,
                    "dense_ms": dense[best],
                    "baseline": best,
                    "baselines_ms": dense,
                    "sparse_ms": sparse_ms,
                    "speedup": dense[best] / sparse_ms,
                    "lte_every_group_ms": masked_ms,
                    "threads": args.threads,
                    "shape": {k: getattr(args, k) for k in ("hidden", "width", "experts", "top_k", "group")},
                }
                rows.append(row)
                print(
                    f"{name} {sparsity:.0%}: best dense {best} {dense[best]:.2f} ms, LTE {sparse_ms:.2f} ms "
                    f"({row['speedup']:.2f}x); LTE every group (masked) {masked_ms:.2f} ms",
                    flush=True,
                )
        del module
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "cpu": cpu.isa_key()}, f, indent=2)


if __name__ == "__main__":
    main()
