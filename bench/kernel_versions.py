"""The CPU kernel's quantized products at a git revision against the working tree's, in one process.

    python bench/kernel_versions.py 9591ade --json bench/results/kernel_versions_cpu.json

Both builds are loaded side by side (each file's source hash names its own extension and custom ops) and timed
alternately, repeat by repeat, on the same tensors: ``slot_matvec`` (a first projection, [FFN, hidden] rows) and
``slot_matvec_t`` (the export's down projection, column-scaled rows) of Llama-2-7B's FFN (4096 x 11008, 32-neuron
experts), int8 and int4, every expert and half of them; medians. Load on the machine moves both alike, which a
comparison between two ``lte bench kernel`` runs cannot promise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import cpu, quant  # noqa: E402  (the working tree's)


def kernel_at(revision: str, directory: Path):
    """kernels/cpu.py as of ``revision``, imported under another module name."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:kernels/cpu.py"], capture_output=True, text=True, check=True
    ).stdout
    path = directory / "kernel_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("kernel_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision whose kernels/cpu.py is the baseline")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json")
    args = parser.parse_args()
    hidden, ffn, size = 4096, 11008, 32
    with tempfile.TemporaryDirectory() as tmp:
        old = kernel_at(args.revision, Path(tmp))
        if not (old.available() and cpu.available()):
            sys.exit("a CPU kernel could not be built (it needs a C++ compiler and ninja)")
        g = torch.Generator().manual_seed(0)
        rows = []
        for bits in (8, 4):
            q, s = quant.quantize(torch.randn(ffn, hidden, generator=g), bits)
            qd, sd = quant.quantize(torch.randn(hidden, ffn, generator=g), bits)
            rows_t, scales_t = quant.transposed(quant.unpack(qd, sd), sd, bits)
            x, h = torch.randn(1, hidden, generator=g), torch.randn(1, ffn, generator=g)
            experts = ffn // size
            for share in (1.0, 0.5):
                order = torch.randperm(experts, generator=g).to(torch.int32)
                count = torch.tensor([int(experts * share)], dtype=torch.int32)
                calls = {
                    "slot_matvec": lambda k, order=order, count=count, q=q, s=s, x=x: k.slot_matvec(
                        x, q, order, count, size, 0, s
                    ),
                    "slot_matvec_t": lambda k, order=order, count=count, r=rows_t, st=scales_t, h=h: k.slot_matvec_t(
                        h, r, order, count, size, st, hidden
                    ),
                }
                for name, call in calls.items():
                    times = {"revision": [], "working tree": []}
                    for _ in range(args.repeats):
                        for side, kernel in (("revision", old), ("working tree", cpu)):
                            start = time.perf_counter()
                            call(kernel)
                            times[side].append(time.perf_counter() - start)
                    before, after = (1e3 * statistics.median(times[k]) for k in ("revision", "working tree"))
                    rows.append(
                        dict(bits=bits, experts_share=share, product=name, revision_ms=before, working_tree_ms=after)
                    )
                    print(f"int{bits} {share:.0%} {name}: {before:.2f} ms -> {after:.2f} ms ({before / after:.2f}x)")
    if args.json:
        result = {
            "revision": args.revision,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "shape": f"{hidden}x{ffn}",
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
