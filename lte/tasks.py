"""Zero-shot multiple-choice accuracy by log-likelihood (the lm-evaluation-harness way).

Each example is a context and a few continuations; the model picks the continuation with the
highest summed log-probability (``acc``) or the highest per-character log-probability
(``acc_norm``); the tables report what lm-eval headlines (:data:`HEADLINE`: ``acc_norm`` for
HellaSwag, ``acc`` for the others). Prompts follow lm-eval's, with the tokenizer's BOS first
(these models are trained with it):

* PIQA: ``Question: {goal}\\nAnswer:`` + `` {solution}``;
* ARC-Easy: ``Question: {question}\\nAnswer:`` + `` {choice}``;
* HellaSwag: the cleaned context + `` {ending}``;
* BoolQ: ``{passage}\\nQuestion: {question}?\\nAnswer:`` + `` yes`` / `` no``.

Files are read in the layouts of ``../shared/data`` (PIQA ``valid.jsonl`` with
``valid-labels.lst`` beside it; ARC as the Hugging Face ``ai2_arc`` JSON; HellaSwag as a list of
``{question, choices{A..D}, answer}`` or that list under ``test``; BoolQ ``jsonl``). Pass
``name=PATH``, or a bare name with a directory holding ``piqa/``, ``arc_easy/``... .
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

TASKS = ("piqa", "arc_easy", "hellaswag", "boolq")
HEADLINE = {"piqa": "acc", "arc_easy": "acc", "hellaswag": "acc_norm", "boolq": "acc"}  # what lm-eval reports
DEFAULT_FILES = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc_easy/validation.json",
                 "hellaswag": "hellaswag/hellaswag.json", "boolq": "boolq/validation.jsonl"}


@dataclass
class Example:
    context: str
    continuations: list[str]
    label: int


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _piqa(path: Path) -> list[Example]:
    labels_file = path.with_name(path.stem + "-labels.lst")
    if not labels_file.is_file():
        raise UsageError(f"PIQA needs its labels beside the data: {labels_file} not found")
    labels = [int(line) for line in labels_file.read_text().split()]
    return [Example(f"Question: {r['goal']}\nAnswer:", [f" {r['sol1']}", f" {r['sol2']}"], label)
            for r, label in zip(_jsonl(path), labels)]


def _arc(path: Path) -> list[Example]:
    out = []
    for r in json.loads(path.read_text()):
        labels = list(r["choices"]["label"])
        out.append(Example(f"Question: {r['question']}\nAnswer:", [f" {t}" for t in r["choices"]["text"]],
                           labels.index(r["answerKey"])))
    return out


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: Path) -> list[Example]:
    data = json.loads(path.read_text())
    items = data["test"] if isinstance(data, dict) else data
    out = []
    for r in items:
        keys = sorted(r["choices"])
        out.append(Example(_clean_hellaswag(r["question"]), [" " + _clean_hellaswag(r["choices"][k]) for k in keys],
                           keys.index(r["answer"])))
    return out


def _boolq(path: Path) -> list[Example]:
    return [Example(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"], int(bool(r["answer"])))
            for r in _jsonl(path)]


LOADERS = {"piqa": _piqa, "arc_easy": _arc, "hellaswag": _hellaswag, "boolq": _boolq}


def parse_tasks(spec: str, task_dir: str | None) -> dict[str, Path]:
    """``piqa,arc_easy=path/x.json`` -> {name: file}; bare names are found under ``task_dir``."""
    tasks = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, path = item.partition("=")
        if name not in LOADERS:
            raise UsageError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        if not path:
            if task_dir is None:
                raise UsageError(f"task {name}: give {name}=PATH or --task-dir DIR (a directory with {DEFAULT_FILES[name]})")
            path = str(Path(task_dir) / DEFAULT_FILES[name])
        if not Path(path).is_file():
            raise UsageError(f"task {name}: {path} not found")
        tasks[name] = Path(path)
    return tasks


def load_task(name: str, path: Path, limit: int | None = None) -> list[Example]:
    try:
        examples = LOADERS[name](path)
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"task {name}: {path} is not in the expected format ({type(exc).__name__}: {exc})") from None
    return examples[:limit] if limit else examples


@torch.no_grad()
def choice_logprobs(model, tokenizer, example: Example, handle=None, max_length: int | None = None) -> list[float]:
    """Summed log-probability of each continuation given the context (context and continuation
    tokenised separately and joined, as lm-eval does).

    The choices run as one right-padded batch. ``handle.prefix`` is set to the context length
    minus one: GRIFFIN selects its neurons from the context but its last token (as in its
    classification mode), and every prediction of an answer token is made sparse.
    """
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    context = bos + tokenizer(example.context, add_special_tokens=False)["input_ids"]
    sequences, starts = [], []
    for continuation in example.continuations:
        full = context + tokenizer(continuation, add_special_tokens=False)["input_ids"]
        cut = max(0, len(full) - max_length) if max_length else 0  # drop the context's start, choice by choice
        sequences.append(full[cut:])
        starts.append(max(len(context) - cut, 1))  # an answer longer than the window loses its own start
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    if handle is not None:  # the position predicting the first answer token runs sparse
        handle.prefix = min(starts) - 1
    logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
    totals = []
    for i, (s, start) in enumerate(zip(sequences, starts)):
        targets = torch.tensor(s[start:], device=device)
        totals.append(float(logp[i, start - 1: len(s) - 1].gather(-1, targets[:, None]).sum()))
    return totals


def accuracy(model, tokenizer, examples: list[Example], handle=None, max_length: int | None = None) -> dict[str, float]:
    """acc (highest summed log-probability) and acc_norm (per character) of ``model``, with
    ``handle``'s sparsity if given, on ``examples``."""
    correct = correct_norm = 0
    for example in examples:
        scores = choice_logprobs(model, tokenizer, example, handle, max_length)
        normed = [score / max(len(c), 1) for score, c in zip(scores, example.continuations)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == example.label)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == example.label)
    n = max(len(examples), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": len(examples)}
