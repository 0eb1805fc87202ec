"""How often an exported LTE MoE's own top-k expert choices agree with the original model's, per MoE layer.

    python scripts/moe_topk_agreement.py ORIGINAL_DIR EXPORT_DIR [TEXT_FILE] [--tokens N]

Both models read the same held-out text (default: assets/tinystories/eval.txt); a layer's figure is the mean
share of a token's k experts that the sparse export chose as the original did (1.0 = identical choices).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lte.model.experts import top_k_agreement, top_k_choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("export")
    parser.add_argument("text", nargs="?", default="assets/tinystories/eval.txt")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.export)
    with open(args.text) as f:
        ids = tokenizer(f.read(args.tokens * 8))["input_ids"][: args.tokens]
    n = len(ids) // args.block * args.block
    batches = [{"input_ids": torch.tensor(ids[i : i + args.block])[None]} for i in range(0, n, args.block)]
    original = AutoModelForCausalLM.from_pretrained(args.original).eval()
    sparse = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True).eval()
    agreement = top_k_agreement(top_k_choices(original, batches), top_k_choices(sparse, batches))
    for path, value in agreement.items():
        print(f"{path}: {100 * value:.1f}% of top-k experts as the original chose ({n} tokens)")


if __name__ == "__main__":
    main()
