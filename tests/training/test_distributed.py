"""Real multi-process training on CPU: two processes over gloo, started by `accelerate launch` with
the project's named accelerate configs (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO
from moe_configs import BF16_VALIDATION_ERROR

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = ["lte.stage1_steps=8", "lte.stage2_steps=4"]
# config file, extra launcher flags, entry point, what the logs must call it
CONFIGS = {
    "ddp": ("ddp.yaml", ["--mixed_precision", "no"], "train.py", "DDP"),
    # accelerate takes its FSDP branch only for accelerator process groups; the shim lets it on CPU (see the file)
    "fsdp2": ("fsdp2.yaml", ["--mixed_precision", "no"], "tests/fsdp_on_cpu.py", "FSDP2"),
    "zero2": ("zero2.yaml", [], "train.py", "DeepSpeed ZeRO-2"),
    "zero3": ("zero3.yaml", [], "train.py", "DeepSpeed ZeRO-3"),
}
SHARDED = ("fsdp2", "zero3")  # parameters (so routers) split across the processes


def launch_command(config, out, port, *extra, run=None):
    """``run``: the run's own arguments (default: the tiny recipe with FAST, into ``out``)."""
    file, flags, entry, _ = CONFIGS[config]
    run = ["recipe=tiny", f"output_dir={out}", *FAST] if run is None else run
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / file),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        *flags,
        entry,
        *run,
        *extra,
    ]


def logged_losses(out, stage, step):
    state = json.loads((out / stage / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "task_loss" in h]


def final_losses(out):
    return {stage: logged_losses(out, stage, n) for stage, n in (("stage1", 8), ("stage2", 4))}


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = subprocess.run(
        launch_command("ddp", out, 29533, *STEPS), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr


def test_ddp_two_processes_train_identical_routers_and_export(ddp_run):
    out, log = ddp_run
    for stage in ("stage1", "stage2"):
        assert f"{stage}: training" in log and "on 2 process(es) (DDP)" in log  # both ranks joined
        assert f"{stage}: routers identical on all 2 processes" in log
    losses = final_losses(out)
    for stage, values in losses.items():
        assert values[-1] < 0.9 * values[0], (stage, values)  # the objective each stage optimises went down
    report = json.loads((out / "report.json").read_text())
    assert report["export_dir"] == "export" and (out / "export" / "model.safetensors").is_file()
    assert report["export"]["heldout_sparsity"] > 0.3


@pytest.mark.parametrize("config", ["fsdp2", "zero2", "zero3"])
def test_sharded_two_process_runs_train_both_stages_and_export(config, tmp_path):
    """Each stage trains on both ranks under the named config, the routers end identical (gathered
    whole from the shards), the finished stages are gathered into one checkpoint, and the export loads."""
    out = tmp_path / "run"
    proc = subprocess.run(
        launch_command(config, out, 29560 + list(CONFIGS).index(config), "export.allocation=uniform"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stderr
    assert proc.returncode == 0, log[-4000:]
    name = CONFIGS[config][3]
    for stage in ("stage1", "stage2"):
        assert log.count(f"{stage}: training 4 steps") == 2 and f"on 2 process(es) ({name})" in log
        identical = re.findall(
            rf"{stage}: routers identical on all 2 processes \((\d+) router parameters, (\d+) stored", log
        )
        assert len(identical) == 2, identical  # checked on both ranks
        total, local = map(int, identical[0])
        assert total == 5 * 43 * 64  # stories260K: 5 layers x 43 experts x d_model 64
        assert (local < total) if config in SHARDED else (local == total)
        losses = logged_losses(out, stage, 4)
        assert len(losses) == 4 and losses[-1] < losses[0], (stage, losses)
        assert (out / stage / "model" / "lte_routers.safetensors").is_file()
    if config == "zero3":
        assert "model loaded partitioned by ZeRO-3" in log and "ZeRO-3: 5 LTE FFNs registered as leaf modules" in log
    assert (out / "prepare" / "model" / "lte_config.json").is_file() and log.count("prepare: 5 FFNs grouped") == 1
    # what stage 1 trained (on shards) is what its gathered checkpoint holds; stage 2 kept it frozen
    prepared = load_file(str(out / "prepare" / "model" / "lte_routers.safetensors"))
    stage1 = load_file(str(out / "stage1" / "model" / "lte_routers.safetensors"))
    stage2 = load_file(str(out / "stage2" / "model" / "lte_routers.safetensors"))
    assert set(prepared) == set(stage1) == set(stage2) and len(stage1) == 5
    assert all(not torch.equal(prepared[k], stage1[k]) and torch.equal(stage1[k], stage2[k]) for k in stage1)
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["sparse_ppl"] < 10 * report["dense_ppl"]  # finite and sane after 4 + 4 steps
    exported = json.loads((out / "export" / "lte_export.json").read_text())
    assert abs(exported["heldout_sparsity"] - 0.5) < 0.03 and exported["validation_error"] < 1e-4

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "export", trust_remote_code=True)
    model.config.lte_track_sparsity = True
    tokenizer = AutoTokenizer.from_pretrained(out / "export", trust_remote_code=True)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    per_layer = model.lte_sparsity()
    assert len(per_layer) == 5 and 0.3 < sum(per_layer) / 5 < 0.7, per_layer


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(ddp_run, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "run"
    # the resumed run is compared with the reference by its training losses: no export stage (an export
    # setting does not change the training; test_ddp_two_processes_train_identical_routers_and_export has it)
    steps = [*STEPS, "export.target_sparsity=null"]
    proc = subprocess.Popen(
        launch_command("ddp", out, 29544, *steps), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    marker = out / "stage1" / "checkpoint-2" / "trainer_state.json"
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    # SIGKILL the launcher and both ranks (torch's elastic agent starts the ranks in their own sessions)
    tree = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert not (out / "stage1" / "model").exists()  # really interrupted inside stage 1
    done = sorted(
        int(p.name.split("-")[1]) for p in (out / "stage1").glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )
    assert done and done[-1] < 8
    # a checkpoint the run was writing when it died: no trainer_state.json; it must not be resumed from
    partial = out / "stage1" / "checkpoint-7"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    rerun = subprocess.run(
        launch_command("ddp", out, 29555, *steps), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"stage1: resuming from {out / 'stage1' / f'checkpoint-{done[-1]}'}" in rerun.stderr
    assert "removing" in rerun.stderr and "checkpoint-7" in rerun.stderr
    assert "prepare: experts and routers found" in rerun.stderr  # the one-process step is not redone
    state = json.loads((out / "stage1" / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "task_loss" in h]
    assert steps == list(range(1, 9))  # continued, did not restart (history up to the checkpoint is kept)
    got, want = final_losses(out), final_losses(reference)
    for stage in ("stage1", "stage2"):
        assert got[stage][-1] == pytest.approx(want[stage][-1], rel=1e-3), (stage, got, want)


def run_moe_recipe(config, tmp_path, port, *extra) -> tuple[str, object]:
    """`recipe=qwen2_moe` (a tiny random Qwen2-MoE) on two processes under ``config``; (its log, its run dir)."""
    from test_recipes import cpu_overrides

    run = ["recipe=qwen2_moe", *cpu_overrides("qwen2_moe", tmp_path), "train.report_to=[]", *extra]
    # two steps at the recipe's rates, within its 100 warm-up steps, may leave bf16 weights where they were
    run += ["train.learning_rate=1e-3", "train.warmup_steps=0"]
    proc = subprocess.run(launch_command(config, None, port, run=run), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr, tmp_path / "run"


@pytest.mark.parametrize("config", SHARDED)
def test_the_moe_recipe_trains_sharded_expert_tensors(config, tmp_path):
    """`recipe=qwen2_moe` (a tiny random Qwen2-MoE, the recipe's bf16 and gradient checkpointing) on two processes
    under FSDP2 and ZeRO-3: the 3-D expert tensors and the [experts, groups, hidden] routers are sharded, both
    stages train them, the stage checkpoints are gathered whole under the base names, the model's own router
    stays frozen, and the export lands at its target."""
    log, out = run_moe_recipe(config, tmp_path, 29570 + SHARDED.index(config))
    prepared = load_file(str(out / "prepare" / "model" / "lte_routers.safetensors"))
    assert len(prepared) == 4 and prepared["layers.0.weight"].dim() == 3  # routed experts' routers, shared ones
    for stage in ("stage1", "stage2"):
        assert log.count(f"{stage}: training 2 steps") == 2 and f"on 2 process(es) ({CONFIGS[config][3]})" in log
        identical = re.findall(
            rf"{stage}: routers identical on all 2 processes \((\d+) router parameters, (\d+) stored", log
        )
        assert len(identical) == 2, identical
        total, local = map(int, identical[0])
        assert total == sum(t.numel() for t in prepared.values()) and local < total  # sharded, gathered whole
    if config == "zero3":
        assert "model loaded partitioned by ZeRO-3" in log and "ZeRO-3: 4 LTE FFNs registered as leaf modules" in log
    before = load_file(str(out / "prepare" / "model" / "model.safetensors"))
    after = load_file(str(out / "stage1" / "model" / "model.safetensors"))
    assert set(before) == set(after)  # the base checkpoint's own per-expert names
    experts = [k for k in before if ".mlp.experts." in k]
    assert len(experts) == 2 * 4 * 3 and all(not torch.equal(before[k], after[k]) for k in experts)
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(torch.equal(before[k], after[k]) for k in routers)  # frozen by default
    trained = load_file(str(out / "stage1" / "model" / "lte_routers.safetensors"))
    assert [k for k in prepared if torch.equal(prepared[k], trained[k])] == []
    exported = json.loads((out / "export" / "lte_export.json").read_text())
    assert abs(exported["heldout_sparsity"] - 0.5) < 0.03, exported
    assert exported["validation_error"] < BF16_VALIDATION_ERROR, exported


@pytest.mark.parametrize("config", SHARDED)
def test_lora_on_sharded_expert_tensors_merges_into_every_expert(config, tmp_path):
    """`recipe=qwen2_moe lora.r=8` on two processes under FSDP2 and ZeRO-3: PEFT's adapters on the 3-D expert
    tensors (``target_parameters``) and on the linear layers train on sharded weights, and each stage merges them
    into its checkpoint under the base names: every expert tensor moved, the model's own router did not, and the
    export lands at its target."""
    log, out = run_moe_recipe(config, tmp_path, 29575 + SHARDED.index(config), "lora.r=8")
    start = "prepare"
    for stage in ("stage1", "stage2"):
        assert log.count(f"{stage}: training 2 steps") == 2
        assert f"on 2 process(es) ({CONFIGS[config][3]})" in log
        assert (out / stage / "adapter" / "adapter_config.json").is_file()
        before = load_file(str(out / start / "model" / "model.safetensors"))
        after = load_file(str(out / stage / "model" / "model.safetensors"))
        assert set(before) == set(after)  # merged: the base checkpoint's own names, no adapter keys
        experts = [k for k in before if ".mlp.experts." in k]
        assert len(experts) == 2 * 4 * 3 and [k for k in experts if torch.equal(before[k], after[k])] == [], stage
        attention = [k for k in before if k.endswith("self_attn.q_proj.weight")]
        assert attention and all(not torch.equal(before[k], after[k]) for k in attention)
        routers = [k for k in before if k.endswith("mlp.gate.weight")]
        assert len(routers) == 2 and all(torch.equal(before[k], after[k]) for k in routers)  # frozen
        start = stage
    exported = json.loads((out / "export" / "lte_export.json").read_text())
    assert abs(exported["heldout_sparsity"] - 0.5) < 0.03, exported
    assert exported["validation_error"] < BF16_VALIDATION_ERROR, exported
