"""Smoke test of the main job: `train.py recipe=tiny` with a few steps per stage, rerun, resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_train


def test_report_has_the_promised_keys_and_sane_values(tiny_run):
    out, proc = tiny_run
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_ppl", "sparse_ppl", "sparsity", "per_layer_sparsity", "export_dir", "recipe"):
        assert key in report
    assert 3.0 < report["dense_ppl"] < 6.0  # stories260K on held-out TinyStories
    assert report["sparse_ppl"] > 1.0
    assert len(report["per_layer_sparsity"]) == 5
    assert all(0.0 <= s <= 1.0 for s in report["per_layer_sparsity"])
    assert report["sparsity"] == pytest.approx(sum(report["per_layer_sparsity"]) / 5)
    assert 0.2 < report["sparsity"] < 0.8  # routers were fitted to drop about half of the experts
    assert report["recipe"]["lte"]["stage1_steps"] == 4
    assert (out / "per_layer_sparsity.png").stat().st_size > 1000
    assert "LTE run finished" in proc.stdout and "FFN sparsity" in proc.stdout
    # the held-out documents (paragraphs) after BOS, after EOS and packed: the same tokens, each model's perplexity
    for layouts, models in (
        (report["layouts"], ("dense", "sparse")),
        (report["export"]["layouts"], ("dense", "sparse")),
    ):
        assert list(layouts) == ["bos", "eos", "packed"] and len({v["tokens"] for v in layouts.values()}) == 1
        assert all(1.0 < v[f"{m}_ppl"] < 1e3 for v in layouts.values() for m in models)
    assert 0.2 < report["layouts"]["eos"]["sparse_sparsity"] < 0.8
    assert "held-out layouts     sparse: <s> doc" in proc.stdout and "</s> doc" in proc.stdout


def test_each_stage_leaves_checkpoints_and_a_model(tiny_run):
    out, _ = tiny_run
    for stage in ("stage1", "stage2"):
        assert (out / stage / "model" / "lte_routers.safetensors").is_file()
        assert (out / stage / "checkpoint-4" / "trainer_state.json").is_file()
    state = json.loads((out / "stage1" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "efficiency_loss" in h]
    assert logged and all("sparsity/layer_04" in h for h in logged)


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    # Simulate a run stopped in stage 2 after its step-2 checkpoint: no finished model, later checkpoints gone.
    shutil.rmtree(copy / "stage2" / "model")
    shutil.rmtree(copy / "stage2" / "checkpoint-4")
    (copy / "report.json").unlink()
    proc = run_train(copy, entry=("-m", "lte", "train"))
    log = proc.stderr
    assert "stage1: finished model found" in log
    assert "stage2: resuming from" in log and "checkpoint-2" in log
    state = json.loads((copy / "stage2" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [h["step"] for h in state["log_history"] if "task_loss" in h]
    assert steps[-2:] == [3, 4]  # continued after step 2, did not restart
    assert (copy / "report.json").is_file()


@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory):
    """A run with a 2-step dense fine-tune (stage 0) and a stage 2 of no steps."""
    out = tmp_path_factory.mktemp("stage0") / "run"
    return out, run_train(out, "lte.stage0_steps=2", "lte.stage2_steps=0", "export.allocation=uniform")


@pytest.mark.slow
def test_a_stage_with_no_steps_keeps_its_starting_model(stage0_run):
    out, _ = stage0_run
    for name in ("model.safetensors", "lte_routers.safetensors"):
        assert (out / "stage2" / "model" / name).read_bytes() == (out / "stage1" / "model" / name).read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["sparsity"] < 1 and report["sparse_ppl"] > 0


@pytest.mark.slow
def test_stage0_fine_tunes_the_dense_model_and_is_reported_as_the_reference(stage0_run):
    out, proc = stage0_run
    stage0 = out / "stage0" / "model"
    assert (stage0 / "model.safetensors").is_file() and not (stage0 / "lte_routers.safetensors").exists()
    original = load_file(REPO / "assets" / "stories260K" / "model.safetensors")
    tuned = load_file(stage0 / "model.safetensors")
    assert any(not torch.equal(original[k], tuned[k]) for k in original)  # two optimizer steps moved the weights
    report = json.loads((out / "report.json").read_text())
    assert report["stage0_ppl"] != report["dense_ppl"] and 3.0 < report["stage0_ppl"] < 6.0
    assert report["ppl_increase_vs_stage0"] == pytest.approx(report["sparse_ppl"] / report["stage0_ppl"] - 1)
    assert "stage 0 (dense fine-tuned)" in proc.stdout
