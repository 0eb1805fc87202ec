"""Does a run's sparse model fit its training text better than held-out text? (An overfitting check.)

    python bench/train_vs_heldout.py runs/tiny [--tokens 32768]

Perplexity of the original model and of the run's stage-2 model (hard routing, trained thresholds) on
the first ``--tokens`` tokens of the run's training data and of its held-out data, batched the way
training and evaluation batch them. If the sparse model's increase over the original is much smaller
on the training text than on held-out text, stage 2 is fitting the training text rather than
recovering the original model.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from lte.core.run_dir import stage2_model
from lte.model.inject import load_lte
from lte.training.config import load_run_recipe
from lte.training.data import LMData, build_data
from lte.training.evaluate import evaluate_batches
from lte.training.loading import calibration_batches, load_tokenizer, model_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()

    recipe = load_run_recipe(args.run_dir)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    batch = recipe.train.get("per_device_eval_batch_size", 8)
    texts = {
        "training": calibration_batches(data, tokenizer, args.tokens, batch),
        "held-out": calibration_batches(LMData(data.eval, data.eval, data.padded), tokenizer, args.tokens, batch),
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {
        "original": AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **model_kwargs(recipe)),
        "sparse": load_lte(stage2_model(args.run_dir), **model_kwargs(recipe)),
    }
    ppl = {
        (m, t): evaluate_batches(model.to(device), batches).ppl
        for m, model in models.items()
        for t, batches in texts.items()
    }
    print(f"{args.run_dir}: first {args.tokens} tokens of each text")
    for text in texts:
        original, sparse = ppl["original", text], ppl["sparse", text]
        print(
            f"  {text:9s} text  original {original:.4f}  sparse {sparse:.4f}  ({100 * (sparse / original - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
