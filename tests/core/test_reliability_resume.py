"""Resume that survives kills and damage, a run record that cannot lie, one trainer per output_dir,
and divergence you can recover from (lte/core/record.py, lte/pipeline.py, lte/core/faults.py).

The kills are SIGKILLs at deterministic points, through the test-only LTE_TEST_FAULT hook."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO
from lte.cli import main
from lte.core.errors import UsageError
from lte.core.record import plan_rerun

FAULT = "LTE_TEST_FAULT"
NO_EXPORT = "export.target_sparsity=null"  # the chains compare models, not exports: skip the export stage


def train_cmd(out, *extra):
    return [sys.executable, "train.py", "recipe=tiny", f"output_dir={out}", *FAST, *extra]


def run(cmd, fault=None, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != FAULT}
    if fault:
        env[FAULT] = fault
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line of a refused command (progress bars may print after it)."""
    lines = re.findall(r"error: .*", stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def temporaries(directory):
    return [p.name for p in directory.rglob("*.lte-*") if re.search(r"\.lte-(tmp|old|trash)-\d+-", p.name)]


def assert_same_weights(a, b):
    for name in ("model.safetensors", "lte_routers.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_killed_training_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
    base, _ = tiny_run
    out = tmp_path / "run"
    cmd = train_cmd(out, NO_EXPORT)
    # 1. stopped in the middle of stage 1; meanwhile a second run on the same output_dir is turned away
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, FAULT: "pause@stage1:step3"}, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 600
        while "paused at stage1:step3" not in log.read_text():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        second = run(cmd)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"another process (PID {first.pid}) is training into {out}" in error_line(second.stderr)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert (out / "stage1" / "checkpoint-2").is_dir() and not (out / "stage1" / "model").exists()
    # 2. SIGKILL inside stage 2's step-4 checkpoint: optimizer written, trainer_state.json not yet
    proc = run(cmd, "stage2:checkpoint4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "stage1: resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    assert (out / "stage2" / "checkpoint-4" / "optimizer.pt").is_file()
    assert not (out / "stage2" / "checkpoint-4" / "trainer_state.json").exists()
    # 3. SIGKILL while the finished stage-2 model is written (to its temporary directory)
    proc = run(cmd, "stage2:model")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "trainer_state.json is missing" in proc.stderr
    assert not (out / "stage2" / "model").exists() and temporaries(out / "stage2")
    # 4. and the newest checkpoint damaged (a truncated model file), then the same command again
    weights = out / "stage2" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-4 cannot be resumed from: model.safetensors is truncated" in proc.stderr
    assert re.search(r"stage2: resuming from \S*checkpoint-2", proc.stderr)
    assert temporaries(out) == []
    assert_same_weights(out / "stage2" / "model", base / "stage2" / "model")
    state = json.loads((out / "stage2" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_killed_export_resumes_to_the_uninterrupted_result_from_any_directory(tiny_run, tmp_path):
    base, _ = tiny_run
    out = tmp_path / "exported"
    cmd = [
        sys.executable,
        "-m",
        "lte",
        "export",
        str(base),
        "--target-sparsity",
        "0.5",
        "--calibration-tokens",
        "4096",
        "--out",
        str(out),
    ]
    for point in ("export:tuning", "export:written"):
        proc = run(cmd, point, cwd=tmp_path)  # not the directory the run was trained from
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert not out.exists()
    assert temporaries(tmp_path)  # the killed write left its temporary directory
    proc = run(cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert temporaries(tmp_path) == []  # removed: its process is gone
    exported = json.loads((out / "lte_export.json").read_text())
    uninterrupted = json.loads((base / "export" / "lte_export.json").read_text())
    assert exported["thresholds"] == pytest.approx(uninterrupted["thresholds"], rel=1e-6)
    assert exported["sparse_ppl"] == pytest.approx(uninterrupted["sparse_ppl"], rel=1e-6)


def test_a_changed_recipe_on_a_finished_run_is_refused_with_the_keys(tiny_run, monkeypatch, capsys):
    from test_reliability_outputs import tree_hash

    base, _ = tiny_run
    monkeypatch.chdir(REPO)
    lock = base / ".lte-lock"  # the run's own lock file: the refusing process writes its PID there
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file() and p != lock}
    digest = tree_hash(base / "stage2")
    assert (
        main(
            [
                "train",
                "recipe=tiny",
                f"output_dir={base}",
                *FAST,
                "lte.expert_size=2",
                "train.stage2.learning_rate=1e-3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("error: ")
        and "lte.expert_size (4 -> 2)" in err
        and "train.stage2.learning_rate (0.002 -> 0.001)" in err
    )
    assert "new output_dir" in err and "restart_from=prepare" in err
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file() and p != lock} == before
    assert tree_hash(base / "stage2") == digest


def test_following_the_divergence_message_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(out, NO_EXPORT, "train.save_steps=1")
    proc = run([*cmd, "train.stage2.learning_rate=1e6"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_line(proc.stderr)
    assert re.match(r"error: stage2 diverged: the loss became (nan|inf|-inf) at step \d+", message), message
    assert "Lower train.stage2.learning_rate (now 1e+06)" in message
    assert (out / "stage2" / "checkpoint-1").is_dir()  # a checkpoint with the diverging rate's optimizer state
    assert (out / "stage1" / "model").is_dir()
    key = re.search(r"add (train\.stage2\.learning_rate)=\S+ to the same command", message).group(1)
    proc = run([*cmd, f"{key}=2e-3"])  # the advice: that key, lower
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage2: discarding" in proc.stderr and "it diverged" in proc.stderr
    assert "stage1: finished model found" in proc.stderr  # the stage before it was kept
    report = json.loads((out / "report.json").read_text())
    assert 1.0 < report["sparse_ppl"] < 100
    assert all(torch.isfinite(t).all() for t in load_file(out / "stage2" / "model" / "model.safetensors").values())


def test_the_divergence_message_names_each_stages_learning_rate_key():
    from lte.pipeline import learning_rate_key
    from lte.training.config import load_recipe

    recipe = load_recipe(["recipe=tiny", "output_dir=/tmp/x"], check_hardware=False)
    assert learning_rate_key(recipe, "stage1") == "train.learning_rate"
    assert learning_rate_key(recipe, "stage2") == "train.stage2.learning_rate"  # the tiny recipe sets its own
    recipe = load_recipe(["recipe=tiny", "output_dir=/tmp/x", "lte.stage0_steps=2"], check_hardware=False)
    assert learning_rate_key(recipe, "stage0") == "train.learning_rate"
    assert learning_rate_key(recipe, "stage1") == "train.stage1.learning_rate"  # train.learning_rate would redo stage 0


@pytest.mark.parametrize(
    "damage", ["truncated model.safetensors", "truncated optimizer.pt", "empty trainer_state.json"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, damage, caplog):
    from lte.pipeline import last_complete_checkpoint

    base, _ = tiny_run
    stage = tmp_path / "stage2"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(base / "stage2" / name, stage / name)
    kind, name = damage.split(" ")
    file = stage / "checkpoint-4" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if kind == "truncated" else b"")
    assert last_complete_checkpoint(str(stage)) == str(stage / "checkpoint-2")
    assert f"checkpoint-4 cannot be resumed from: {name}" in caplog.text
    assert not (stage / "checkpoint-4").exists()
    (stage / "checkpoint-2" / "trainer_state.json").write_text("")
    assert last_complete_checkpoint(str(stage)) is None  # nothing intact: the stage restarts
    assert "no intact checkpoint left; the stage restarts" in caplog.text


OLD = {
    "output_dir": "/runs/a",
    "seed": 42,
    "model": {"name_or_path": "/m"},
    "data": {"train": "/d.txt"},
    "lte": {"expert_size": 4, "eta": 1.0, "stage0_steps": 0},
    "lora": {"r": 0},
    "train": {"learning_rate": 1e-4, "logging_steps": 1, "stage2": {"learning_rate": 2e-3}},
    "export": {"target_sparsity": 0.5},
}
DONE = {"prepare": "finished", "stage1": "finished", "stage2": "finished"}


def changed(**keys):
    new = json.loads(json.dumps(OLD))
    for dotted, value in keys.items():
        *path, last = dotted.split("__")
        node = new
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return new


@pytest.mark.parametrize(
    ("new", "status", "restart", "discard", "update"),
    [
        (OLD, DONE, None, [], False),  # the same recipe: resume, record untouched
        (changed(export__target_sparsity=0.4), DONE, None, [], True),  # export only: rerun it, update the record
        (changed(train__logging_steps=5), DONE, None, [], True),  # no effect on any result
        (changed(output_dir="/runs/b"), DONE, None, [], True),  # the run was moved
        (OLD, DONE, "stage2", ["stage2"], False),
        (changed(lte__expert_size=2), DONE, "prepare", ["prepare", "stage1", "stage2"], True),
        (changed(train__stage2__learning_rate=1e-3), {**DONE, "stage2": "diverged"}, None, ["stage2"], True),
        (changed(train__learning_rate=1e-5), {"prepare": "finished", "stage1": "diverged"}, None, ["stage1"], True),
        (changed(lte__eta=2.0), {"prepare": "finished", "stage1": "finished"}, "stage1", ["stage1"], True),
    ],
)
def test_rerun_plans(new, status, restart, discard, update):
    plan = plan_rerun(OLD, new, status, restart)
    assert plan.discard == discard and plan.update_record == update


@pytest.mark.parametrize(
    ("new", "status", "names"),
    [
        (changed(lte__expert_size=2), DONE, ["lte.expert_size (4 -> 2)", "restart_from=prepare"]),
        (changed(train__stage2__learning_rate=1e-3), {**DONE, "stage2": "partial"}, ["restart_from=stage2"]),
        (changed(seed=1), {"prepare": "finished"}, ["seed (42 -> 1)", "restart_from=prepare"]),
        (
            changed(train__learning_rate=1e-5, lte__stage0_steps=2),
            {"stage0": "finished", "stage1": "diverged"},
            ["train.learning_rate (0.0001 -> 1e-05)", "restart_from=stage0"],
        ),
    ],
)
def test_rerun_plans_that_would_leave_a_lying_record_are_refused(new, status, names):
    with pytest.raises(UsageError) as refused:
        plan_rerun(OLD, new, status, None)
    for name in names:
        assert name in str(refused.value)
    assert "new output_dir" in str(refused.value)


def test_the_export_stage_never_replaces_another_runs_export(tiny_run, tmp_path, monkeypatch, capsys):
    from test_reliability_outputs import tree_hash

    base, _ = tiny_run
    monkeypatch.chdir(REPO)
    before = tree_hash(base / "export")
    out = tmp_path / "other"
    assert main(["train", "recipe=tiny", f"output_dir={out}", *FAST, f"export.out={base / 'export'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"export.out={base / 'export'} already exists; it is not this run's export" in err
    assert tree_hash(base / "export") == before and not out.exists()  # refused before any work
