"""Zero-shot multiple-choice accuracy through lm-evaluation-harness.

The four tasks are lm-eval task configs shipped in ``lte/compare/task_configs/`` (``lte_piqa``,
``lte_arc_easy``, ``lte_hellaswag``, ``lte_boolq``: lm-eval's prompts over local JSONL files).
Each method's model object goes to lm-eval's ``HFLM`` and ``lm_eval.simple_evaluate`` scores it,
so the numbers are lm-eval's own: the CLI on a checkpoint gives the same ones
(``lm_eval --model hf --model_args pretrained=DIR --include_path lte/compare/task_configs --tasks lte_piqa``).

What lm-eval cannot do stays here:

* reading the files in the layouts they are distributed in (PIQA's labels in a
  ``valid-labels.lst`` beside its ``valid.jsonl``; ARC as the ``ai2_arc`` JSON array; HellaSwag as a
  list of ``{question, choices{A..D}, answer}``, or that list under ``test``; BoolQ ``jsonl``): each is
  rewritten to the JSONL its config reads, and the configs are pointed at those files;
* GRIFFIN, which selects its neurons from the prompt: :class:`PromptAwareLM` scores its requests one
  at a time and tells the method where each prompt ends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError

TASKS = ("piqa", "arc_easy", "hellaswag", "boolq")
HEADLINE = {"piqa": "acc", "arc_easy": "acc", "hellaswag": "acc_norm", "boolq": "acc"}  # what lm-eval reports
DEFAULT_FILES = {
    "piqa": "piqa/valid.jsonl",
    "arc_easy": "arc_easy/validation.json",
    "hellaswag": "hellaswag/hellaswag.json",
    "boolq": "boolq/validation.jsonl",
}
CONFIG_DIR = Path(__file__).resolve().parent / "task_configs"
PREFIX = "lte_"  # lm-eval task names: lte_piqa ... (lm-eval's own `piqa` reads the hub)


def _records(path: Path) -> list[dict]:
    """A JSON array, a JSON object holding one under ``test``, or JSON Lines."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):  # HellaSwag's {"dev": [...], "test": [...]}, or a one-line JSON Lines file
        data = data.get("test", [data])
    return data if isinstance(data, list) else [data]


def _piqa(path: Path) -> list[dict]:
    records = _records(path)
    if records and "label" not in records[0]:
        labels_file = path.with_name(path.stem + "-labels.lst")
        if not labels_file.is_file():
            raise UsageError(f"PIQA needs its labels: a 'label' field, or {labels_file} beside the data")
        labels = [int(line) for line in labels_file.read_text().split()]
        records = [{**r, "label": label} for r, label in zip(records, labels, strict=True)]
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])} for r in records]


def _arc(path: Path) -> list[dict]:
    out = []
    for r in _records(path):
        choices = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
        choices["label"].index(r["answerKey"])  # raises ValueError on a bad key, before lm-eval does
        out.append({"question": r["question"], "choices": choices, "answerKey": r["answerKey"]})
    return out


def _hellaswag(path: Path) -> list[dict]:
    out = []
    for r in _records(path):
        if "endings" in r:  # already {ctx, endings, label}
            out.append({"ctx": r["ctx"], "endings": list(r["endings"]), "label": int(r["label"])})
            continue
        keys = sorted(r["choices"])
        out.append({"ctx": r["question"], "endings": [r["choices"][k] for k in keys], "label": keys.index(r["answer"])})
    return out


def _boolq(path: Path) -> list[dict]:
    return [{"passage": r["passage"], "question": r["question"], "answer": bool(r["answer"])} for r in _records(path)]


READERS = {"piqa": _piqa, "arc_easy": _arc, "hellaswag": _hellaswag, "boolq": _boolq}


def check_lm_eval() -> None:
    """lm-evaluation-harness scores the tasks; say how to get it before any work starts."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(
            "--tasks scores through lm-evaluation-harness, which is not installed: pip install 'lte[eval]' "
            "(or pip install lm-eval)"
        )


def parse_tasks(spec: str, task_dir: str | None) -> dict[str, Path]:
    """``piqa,arc_easy=path/x.json`` -> {name: file}; bare names are found under ``task_dir``."""
    tasks = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, path = item.partition("=")
        if name not in READERS:
            raise UsageError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        if not path:
            if task_dir is None:
                raise UsageError(
                    f"task {name}: give {name}=PATH or --task-dir DIR (a directory with {DEFAULT_FILES[name]})"
                )
            path = str(Path(task_dir) / DEFAULT_FILES[name])
        if not Path(path).is_file():
            raise UsageError(f"task {name}: {path} not found")
        tasks[name] = Path(path)
    return tasks


def read_task(name: str, path: Path, limit: int | None = None) -> list[dict]:
    """The records of ``path`` in the layout ``lte_NAME``'s config reads."""
    try:
        records = READERS[name](path)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"task {name}: {path} is not in the expected format ({type(exc).__name__}: {exc})") from None
    if not records:
        raise UsageError(f"task {name}: {path} has no records")
    return records[:limit] if limit else records


def write_task_configs(tasks: dict[str, Path], directory: Path, limit: int | None = None) -> list[str]:
    """Each task's records as ``directory/NAME.jsonl`` and its config pointed at that file; returns
    the lm-eval task names (pass ``directory`` as lm-eval's ``include_path``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "utils.py").write_text((CONFIG_DIR / "utils.py").read_text())
    names = []
    for name, path in tasks.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in read_task(name, path, limit)))
        config = (CONFIG_DIR / f"{PREFIX}{name}.yaml").read_text()
        config, found = re.subn(
            r"data_files: \{validation: [^}]*\}",
            f"data_files: {{validation: {json.dumps(str(data.resolve()))}}}",
            config,
        )
        if found != 1:
            raise RuntimeError(f"{PREFIX}{name}.yaml lost its one-line data_files; cannot point it at {data}")
        (directory / f"{PREFIX}{name}.yaml").write_text(config)
        names.append(PREFIX + name)
    return names


def _prompt_aware_lm():
    from lm_eval.models.huggingface import HFLM

    class PromptAwareLM(HFLM):
        """HFLM that scores requests one at a time and sets ``handle.prefix`` to where each prompt ends,
        less one: the position that predicts the first answer token runs sparse (GRIFFIN's
        classification mode); the prompt before it is what the method selects its neurons from."""

        def __init__(self, *args, handle, **kwargs):
            super().__init__(*args, **kwargs)
            self.handle = handle

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            out = []
            for request in requests:
                _, context, continuation = request
                length = min(len(context) + len(continuation), self.max_length + 1) - 1  # what the model reads
                self.handle.prefix = max(length - len(continuation), 1)
                out += super()._loglikelihood_tokens([request], disable_tqdm=True, override_bs=override_bs)
            return out

    return PromptAwareLM


@dataclass
class TaskRun:
    """lm-eval's task configs for one comparison, written once and scored for every method."""

    names: list[str]
    include_path: Path
    _manager: object = None

    @property
    def manager(self):
        """One TaskManager over our configs only (indexing lm-eval's thousands of built-in tasks takes seconds)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=str(self.include_path), include_defaults=False)
        return self._manager

    def score(self, model, tokenizer, batch_size: int = 8, handle=None) -> dict[str, dict]:
        """``{task: {"acc", "acc_norm", "examples"}}`` of ``model`` (with ``handle``'s sparsity, which
        stays hooked while lm-eval runs; a handle that reads the prompt gets it request by request)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if handle is not None and getattr(handle, "reads_prompt", False):
            lm = _prompt_aware_lm()(pretrained=model, tokenizer=tokenizer, batch_size=1, handle=handle)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=self.names,
            task_manager=self.manager,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="WARNING",
        )
        return parse_results(results)


def parse_results(results: dict) -> dict[str, dict]:
    """lm-eval's ``results`` (from ``simple_evaluate`` or the CLI's JSON) -> ``{task: {acc, acc_norm, examples}}``."""
    out = {}
    for task, metrics in results["results"].items():
        name = task.removeprefix(PREFIX)
        row = {metric: metrics[f"{metric},none"] for metric in ("acc", "acc_norm") if f"{metric},none" in metrics}
        samples = results.get("n-samples", {}).get(task, {})
        row["examples"] = samples.get("effective", samples.get("original"))
        out[name] = row
    return out


def prepare_tasks(tasks: dict[str, Path], directory: Path, limit: int | None = None) -> TaskRun:
    return TaskRun(write_task_configs(tasks, directory, limit), directory)
