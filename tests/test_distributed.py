"""Real multi-process training on CPU: two processes over gloo, started by `accelerate launch`."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import FAST, REPO

STEPS = ["lte.stage1_steps=8", "lte.stage2_steps=4"]


def launch_command(out, port):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "train.py", "recipe=tiny", f"output_dir={out}", *FAST, *STEPS]


def final_losses(out):
    return {stage: [h["loss"] for h in json.loads((out / stage / f"checkpoint-{n}" / "trainer_state.json").read_text())
                    ["log_history"] if "task_loss" in h]
            for stage, n in (("stage1", 8), ("stage2", 4))}


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = subprocess.run(launch_command(out, 29533), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr


def test_ddp_two_processes_train_identical_routers_and_export(ddp_run):
    out, log = ddp_run
    for stage in ("stage1", "stage2"):
        assert f"{stage}: training" in log and "on 2 process(es)" in log  # both ranks joined
        assert f"{stage}: routers identical on all 2 processes" in log
    losses = final_losses(out)
    for stage, values in losses.items():
        assert values[-1] < 0.9 * values[0], (stage, values)  # the objective each stage optimises went down
    report = json.loads((out / "report.json").read_text())
    assert report["export_dir"] == "export" and (out / "export" / "model.safetensors").is_file()
    assert report["export"]["heldout_sparsity"] > 0.3


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(ddp_run, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_command(out, 29544), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    marker = out / "stage1" / "checkpoint-2" / "trainer_state.json"
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    # SIGKILL the launcher and both ranks (torch's elastic agent starts the ranks in their own sessions)
    tree = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert not (out / "stage1" / "model").exists()  # really interrupted inside stage 1
    done = sorted(int(p.name.split("-")[1]) for p in (out / "stage1").glob("checkpoint-*")
                  if (p / "trainer_state.json").is_file())
    assert done and done[-1] < 8
    # a checkpoint the run was writing when it died: no trainer_state.json; it must not be resumed from
    partial = out / "stage1" / "checkpoint-7"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    rerun = subprocess.run(launch_command(out, 29555), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"stage1: resuming from {out / 'stage1' / f'checkpoint-{done[-1]}'}" in rerun.stderr
    assert "removing" in rerun.stderr and "checkpoint-7" in rerun.stderr
    state = json.loads((out / "stage1" / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "task_loss" in h]
    assert steps == list(range(1, 9))  # continued, did not restart (history up to the checkpoint is kept)
    got, want = final_losses(out), final_losses(reference)
    for stage in ("stage1", "stage2"):
        assert got[stage][-1] == pytest.approx(want[stage][-1], rel=1e-3), (stage, got, want)
