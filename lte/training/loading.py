"""What every command loads from a recipe or a run: model arguments, the tokenizer, the collator,
calibration batches, the held-out layouts' results and the run report.

The training pipeline and the export both use these; keeping them here, below both, keeps the
imports one way (pipeline -> export -> loading).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoTokenizer, default_data_collator

from ..core.run_dir import report_file
from .config import Recipe
from .data import LMData
from .evaluate import EvalResult, evaluate_layouts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def model_kwargs(recipe: Recipe) -> dict:
    kwargs = {"dtype": DTYPES[recipe.model.dtype], "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def load_tokenizer(recipe: Recipe):
    tokenizer = AutoTokenizer.from_pretrained(
        recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
    )
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and the router statistics, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def collator_for(data: LMData, tokenizer):
    if data.padded:  # instruction data: TRL's collator pads input_ids and labels (with -100) per batch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    return default_data_collator


def calibration_batches(data: LMData, tokenizer, tokens: int, batch_size: int) -> list[dict]:
    """The first ``tokens`` training tokens, batched: calibration data for the router init."""
    rows, total = [], 0
    for row in data.train:
        if total >= tokens:
            break
        rows.append(row)
        total += len(row["input_ids"])
    collate = collator_for(data, tokenizer)
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def layout_results(name: str, model, data: LMData, tokenizer, batch_size: int) -> dict[str, EvalResult]:
    """``{"NAME/LAYOUT": result}`` for every held-out layout of ``data`` (none for instruction data)."""
    found = evaluate_layouts(model, data.layouts, tokenizer.pad_token_id, batch_size, what=f"({name})")
    return {f"{name}/{layout}": result for layout, result in found.items()}


def layout_report(results: dict[str, EvalResult]) -> dict:
    """``{layout: {"tokens", "<model>_ppl"...}}`` from :func:`evaluate_run`'s ``NAME/LAYOUT`` results."""
    report: dict = {}
    for key, result in results.items():
        if "/" in key:
            name, layout = key.split("/", 1)
            entry = report.setdefault(layout, {"tokens": result.tokens})
            entry[f"{name}_ppl"] = result.ppl
            if result.sparsity is not None:
                entry[f"{name}_sparsity"] = result.sparsity
    return report


def layout_summary(layouts: dict, name: str = "sparse") -> str:
    """One line: ``NAME``'s perplexity per layout, and each against the first (``<s> doc``)."""
    from .data import LAYOUTS

    if not layouts:
        return ""
    base = next(iter(layouts.values()))[f"{name}_ppl"]
    cells = [
        f"{LAYOUTS.get(k, k)} {v[f'{name}_ppl']:.4f}"
        + ("" if i == 0 else f" ({100 * (v[f'{name}_ppl'] / base - 1):+.1f}%)")
        for i, (k, v) in enumerate(layouts.items())
    ]
    return ", ".join(cells)


def load_report(out: str | os.PathLike) -> dict:
    """``OUTPUT_DIR/report.json``, or ``{}`` for a run without one (copied, or stopped before it)."""
    path = report_file(out)
    return json.loads(path.read_text()) if path.is_file() else {}
