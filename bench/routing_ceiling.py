"""How good can routing be on the embedded model before any training?

    python bench/routing_ceiling.py [--model assets/stories260K] [--expert-sizes 1,2,4] [--tokens 32768] \
        [--sparsity 0.5]

Held-out perplexity of a TinyStories model (the first ``--tokens`` tokens of assets/tinystories/eval.txt)
when half of each FFN's experts are skipped, chosen by:
* the oracle: per layer, the (token, expert) pairs with the largest weighted activation norm
  ``|| h_e * ||W_down[:, e]|| ||`` (the same importance the calibrated router init is fitted to);
* routers from the experts' mean gate rows (MoEfication-style centroids);
* calibrated routers (``lte.router_init=calibrated``), before any training.
The oracle runs for every size in ``--expert-sizes``; the routers use the last one.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, default_data_collator

from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing
from lte.model.router_init import _down_column_norms, calibrate_routers
from lte.training.config import load_recipe
from lte.training.data import build_data
from lte.training.evaluate import evaluate_lm
from lte.training.loading import calibration_batches, load_tokenizer


def oracle(model, sparsity):
    """Hooks that keep, per layer, the most important (token, expert) pairs of each batch."""
    for layer in lte_layers(model):
        weights = _down_column_norms(layer)

        def keep_important(module, args, layer=layer, weights=weights):
            h = args[0]
            experts = h.reshape(*h.shape[:-1], layer.num_experts, layer.expert_size)
            importance = (experts * weights.reshape(layer.num_experts, layer.expert_size)).norm(dim=-1)
            keep = (importance > importance.flatten().quantile(sparsity)).to(h.dtype)
            return ((experts * keep.unsqueeze(-1)).reshape(h.shape),)

        layer.base_layer.get_submodule(layer.spec.down).register_forward_pre_hook(keep_important)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/stories260K", help="a TinyStories model (stories260K tokenizer)")
    parser.add_argument("--expert-sizes", default="1,2,4", help="comma-separated neurons per expert")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    sizes = [int(size) for size in args.expert_sizes.split(",")]
    recipe = load_recipe(
        [
            "recipe=tiny",
            "output_dir=/tmp/unused",
            f"data.max_eval_tokens={args.tokens}",
            f"model.name_or_path={args.model}",
        ]
    )
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)

    def ppl(model):
        return evaluate_lm(model, data.eval, default_data_collator, 16).ppl

    dense = ppl(AutoModelForCausalLM.from_pretrained(args.model))
    print(f"dense: ppl {dense:.3f}")
    for expert_size in sizes:
        model = inject_lte(
            AutoModelForCausalLM.from_pretrained(args.model), LTEModelConfig(expert_size=expert_size), progress=False
        )
        oracle(model, args.sparsity)
        value = ppl(model)
        print(f"oracle, {expert_size}-neuron experts: ppl {value:.3f} ({100 * (value / dense - 1):+.1f}%)")
    for init in ("centroid", "calibrated"):
        model = AutoModelForCausalLM.from_pretrained(args.model)
        inject_lte(
            model,
            LTEModelConfig(expert_size=sizes[-1], router_init="centroid" if init == "centroid" else "random"),
            progress=False,
        )
        if init == "calibrated":
            agreement = calibrate_routers(model, calibration_batches(data, tokenizer, 16384, 16), args.sparsity)
            print(
                f"calibrated routers agree with their labels on {100 * sum(agreement) / len(agreement):.0f}% of pairs"
            )
        set_lte_routing(model, "hard")
        result = evaluate_lm(model, data.eval, default_data_collator, 16)
        print(f"{init} routers, {sizes[-1]}-neuron experts: ppl {result.ppl:.3f} at sparsity {result.sparsity:.3f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
