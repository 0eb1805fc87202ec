"""Where a quantized export's decode step goes: torch's profiler over 17 greedy tokens of a 4-layer copy of
bench/decode_vs_llamacpp.py's model (TinyLlama widths, int8, 50%).

    python bench/decode_profile.py

Prints the aten operators by self time. The CPU kernel is called directly (not through the dispatcher), so it
is not in the table: what the table sums is the time around it.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_vs_llamacpp as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scheme", default="int8", choices=["int8", "int4"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    model = bench.random_llama(argparse.Namespace(hidden=2048, intermediate=5632, layers=args.layers))
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "export"
        thresholds = bench.export_quantized(model, args.scheme, [args.sparsity], out, 32)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    model.eval().config.lte_thresholds = thresholds[args.sparsity]
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    kwargs = {"do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(prompt, max_new_tokens=17, min_new_tokens=17, **kwargs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
