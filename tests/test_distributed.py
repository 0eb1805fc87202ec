"""Real multi-process training on CPU: two processes over gloo, started by `accelerate launch`."""

import json
import subprocess
import sys

from conftest import FAST, REPO


def test_ddp_two_processes_train_identical_routers_and_export(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "train.py", "recipe=tiny", f"output_dir={out}", *FAST, "lte.stage1_steps=6", "lte.stage2_steps=6"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    for stage in ("stage1", "stage2"):
        assert f"{stage}: training 6 steps in" in log and "on 2 process(es)" in log  # both ranks joined
        assert f"{stage}: routers identical on all 2 processes" in log
        state = json.loads((out / stage / "checkpoint-6" / "trainer_state.json").read_text())
        losses = [h["loss"] for h in state["log_history"] if "task_loss" in h]  # the objective the stage optimises
        assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]  # the loss went down
    report = json.loads((out / "report.json").read_text())
    assert report["export_dir"] == "export" and (out / "export" / "model.safetensors").is_file()
    assert report["export"]["heldout_sparsity"] > 0.3
