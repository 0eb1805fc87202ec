"""Sparse upcycling (Komatsuzaki et al. 2022): a dense Llama-architecture checkpoint becomes a Mixtral whose
every layer holds ``--experts`` copies of the layer's FFN and a new top-``--top-k`` router.

The MoE comparison (docs/comparison.md, "Inside the experts of an MoE") needs a mixture-of-experts model
that has learned something and that a CPU can fine-tune: stories260K upcycled, then fine-tuned dense
(``train.py``'s stage 0), is one. Right after upcycling the model computes what the dense one does (the
top-k routing weights sum to one and every expert is the same FFN); the fine-tune makes the experts and
the router diverge. ``--spread MODEL`` prints how far apart each layer's experts are (each expert's
distance from the layer's mean expert, relative to the mean expert's norm).

    python bench/upcycle_moe.py --model assets/stories260K --experts 8 --top-k 2 --out runs/stories260K-moe
    python bench/upcycle_moe.py --spread runs/moe260k-t50/stage0/model
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SHARED = (  # Llama config keys Mixtral reads the same way
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


@torch.no_grad()
def upcycle(dense, experts: int, top_k: int, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    source = dense.config
    config = MixtralConfig(
        **{key: getattr(source, key) for key in SHARED if hasattr(source, key)},
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
    )
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config).to(dense.dtype)
    weights = dense.state_dict()
    own = moe.state_dict()
    ffn = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")  # copied into every expert below
    for name, value in weights.items():
        if ".mlp." in name and name.rpartition(".mlp.")[2] in ffn:
            continue
        if name not in own:  # attention or MLP biases: Mixtral has no place for them
            raise ValueError(f"{name} has no counterpart in a Mixtral; this checkpoint cannot be upcycled here")
        own[name].copy_(value)
    for index, layer in enumerate(moe.model.layers):
        mlp = dense.model.layers[index].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # [2I, H]
        layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
        layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
    return moe


@torch.no_grad()
def spread(model) -> list[float]:
    """Per MoE layer: the root mean square over experts of ``|expert - mean expert| / |mean expert|``
    (gate/up and down together); 0 right after upcycling."""
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        weights = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], dim=1)
        mean = weights.mean(0, keepdim=True)
        out.append(float(((weights - mean).norm(dim=1) / mean.norm()).pow(2).mean().sqrt()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a dense Llama-architecture checkpoint (directory)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--spread", metavar="MODEL", help="only print how far MODEL's experts are apart, per layer")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.spread:
        values = spread(AutoModelForCausalLM.from_pretrained(args.spread, dtype=torch.float32))
        print("experts' spread per layer: " + " ".join(f"{100 * v:.2f}%" for v in values))
        return
    if not args.model or not args.out:
        parser.error("--model and --out are required (or --spread MODEL)")

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    moe = upcycle(dense, args.experts, args.top_k)
    ids = torch.arange(1, 65).reshape(1, -1) % dense.config.vocab_size
    error = float((moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max())
    print(f"upcycled: {args.experts} experts, top {args.top_k}; max logit difference to the dense model {error:.2e}")
    out = Path(args.out)
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    for extra in ("LICENSE", "SOURCE.md"):
        if (Path(args.model) / extra).is_file():
            shutil.copy(Path(args.model) / extra, out / extra)


if __name__ == "__main__":
    main()
