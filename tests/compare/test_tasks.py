"""Zero-shot multiple-choice scoring through lm-evaluation-harness, on records copied into tests/data/tasks."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, STORIES
from lte.compare.tasks import CONFIG_DIR, TASKS, parse_results, parse_tasks, prepare_tasks, read_task
from lte.core.errors import UsageError

TASK_DATA = REPO / "tests" / "data" / "tasks"
LAYOUTS = TASK_DATA / "layouts"  # the first records of each file in the layout it is distributed in


def test_distributed_layouts_read_as_the_configs_records():
    """PIQA with its labels file, ARC's JSON array, HellaSwag's {test: [...]} with letter answers, BoolQ."""
    tasks = parse_tasks(",".join(TASKS), str(LAYOUTS))
    for name, path in tasks.items():
        shipped = [json.loads(line) for line in (TASK_DATA / f"{name}.jsonl").read_text().splitlines()]
        assert read_task(name, path) == shipped[:6], name
        assert (
            read_task(name, TASK_DATA / f"{name}.jsonl", limit=5) == shipped[:5]
        )  # the configs' own layout reads as is
    piqa_labels = [int(x) for x in (LAYOUTS / "piqa" / "valid-labels.lst").read_text().split()]
    assert [r["label"] for r in read_task("piqa", tasks["piqa"])] == piqa_labels
    raw = json.loads((LAYOUTS / "hellaswag" / "hellaswag.json").read_text())["test"]
    assert [r["label"] for r in read_task("hellaswag", tasks["hellaswag"])] == ["ABCD".index(r["answer"]) for r in raw]
    for name in TASKS:  # each shipped config reads the shipped records when lm_eval runs in the repository
        assert (
            f"data_files: {{validation: tests/data/tasks/{name}.jsonl}}"
            in (CONFIG_DIR / f"lte_{name}.yaml").read_text()
        )


def test_bad_task_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'mmlu'"):
        parse_tasks("mmlu", str(LAYOUTS))
    with pytest.raises(UsageError, match="--task-dir"):
        parse_tasks("piqa", None)
    bad = tmp_path / "arc.json"
    bad.write_text('[{"question": "q"}]')
    with pytest.raises(UsageError, match="not in the expected format"):
        read_task("arc_easy", bad)
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(UsageError, match=r"valid-labels\.lst beside the data"):
        read_task("piqa", tmp_path / "valid.jsonl")


def choice_logprob(model, tokenizer, context: str, choice: str, prefix_handle=None) -> float:
    """log p(" choice" | context), tokenised as lm-eval does: the whole string, the context's tokens split off."""
    whole = tokenizer(context + " " + choice)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    cont = whole[len(ctx) :]
    if prefix_handle is not None:
        prefix_handle.prefix = len(ctx) - 1
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def expected_accuracy(model, tokenizer, name: str, records: list[dict], handle=None) -> dict:
    """acc and acc_norm written out from the task's prompt, for comparison with lm-eval's."""
    from lte.compare.task_configs.utils import preprocess

    acc = acc_norm = 0
    for r in records:
        if name == "piqa":
            context, choices, gold = f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]
        elif name == "arc_easy":
            context, choices = f"Question: {r['question']}\nAnswer:", r["choices"]["text"]
            gold = r["choices"]["label"].index(r["answerKey"])
        elif name == "hellaswag":
            context, choices, gold = preprocess(r["ctx"]), [preprocess(e) for e in r["endings"]], r["label"]
        else:
            context, choices, gold = (
                f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                ["no", "yes"],
                int(r["answer"]),
            )
        scores = [choice_logprob(model, tokenizer, context, c, handle) for c in choices]
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        acc += int(max(range(len(scores)), key=scores.__getitem__) == gold)
        acc_norm += int(max(range(len(normed)), key=normed.__getitem__) == gold)
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}


def test_lm_eval_scores_the_model_object_with_each_tasks_prompt(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(
        STORIES
    ).eval()  # the real model: a random one scores all choices alike
    tasks = {name: TASK_DATA / f"{name}.jsonl" for name in TASKS}
    run = prepare_tasks(tasks, tmp_path / "configs", limit=8)
    got = run.score(model, tokenizer, batch_size=4)
    for name in TASKS:
        want = expected_accuracy(model, tokenizer, name, read_task(name, tasks[name], 8))
        assert got[name]["examples"] == 8
        for metric in ("acc", "acc_norm") if name != "boolq" else ("acc",):
            assert got[name][metric] == pytest.approx(want[metric], abs=1e-9), (name, metric)


def test_griffin_selects_from_each_prompt_under_lm_eval(tmp_path):
    """GRIFFIN reads the prompt: lm-eval's requests reach it one at a time, each with its own prompt."""
    from lte.compare.baselines import METHODS

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    records = read_task("arc_easy", TASK_DATA / "arc_easy.jsonl", 12)
    run = prepare_tasks({"arc_easy": TASK_DATA / "arc_easy.jsonl"}, tmp_path / "configs", limit=12)
    handle = METHODS["griffin"](model, 0.9, None)
    try:
        got = run.score(model, tokenizer, batch_size=4, handle=handle)["arc_easy"]
        want = expected_accuracy(model, tokenizer, "arc_easy", records, handle)
    finally:
        handle.remove()
    dense = expected_accuracy(model, tokenizer, "arc_easy", records)
    assert got["acc"] == pytest.approx(want["acc"], abs=1e-9) and got["acc_norm"] == pytest.approx(
        want["acc_norm"], abs=1e-9
    )
    assert (want["acc"], want["acc_norm"]) != (dense["acc"], dense["acc_norm"])  # 90% sparsity changes some answers


def test_lm_eval_cli_on_the_export_gives_lte_compares_numbers(tiny_run, tmp_path):
    """`lm_eval --model hf ... trust_remote_code=True` on the export, with the shipped configs run from the
    repository, and `lte compare --tasks` on that model (LTE at the export's own thresholds) agree."""
    run, _ = tiny_run
    export = run / "export"
    target = json.loads((export / "lte_export.json").read_text())["target_sparsity"]
    names = ",".join(f"lte_{t}" for t in TASKS)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={export},trust_remote_code=True,dtype=float32",
            "--tasks",
            names,
            "--include_path",
            str(CONFIG_DIR),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "lm_eval"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    [results_file] = (tmp_path / "lm_eval").rglob("results_*.json")
    by_cli = parse_results(json.loads(results_file.read_text()))

    out = tmp_path / "cmp"
    cmp = subprocess.run(
        [
            sys.executable,
            "-m",
            "lte",
            "compare",
            "--model",
            str(STORIES),
            "--lte",
            str(export),
            "--data",
            str(REPO / "assets" / "tinystories" / "eval.txt"),
            "--methods",
            "lte",
            "--sparsity",
            str(target),
            "--calibration-tokens",
            "1024",
            "--max-eval-tokens",
            "2048",
            "--tasks",
            ",".join(f"{t}=tests/data/tasks/{t}.jsonl" for t in TASKS),
            "--task-limit",
            "0",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    [row] = json.loads((out / "results.json").read_text())["rows"]
    assert set(by_cli) == set(row["tasks"]) == set(TASKS)
    for name in TASKS:
        assert row["tasks"][name]["examples"] == by_cli[name]["examples"] == 24
        for metric in by_cli[name]:
            assert row["tasks"][name][metric] == pytest.approx(by_cli[name][metric], abs=1e-9), (name, metric)


def test_tasks_without_lm_eval_is_a_usage_error_that_names_the_fix(monkeypatch):
    import importlib.util

    from lte.compare.tasks import check_lm_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'lte\[eval\]'"):
        check_lm_eval()
