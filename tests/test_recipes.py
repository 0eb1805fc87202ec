"""Every shipped recipe validates; bad input gets one clear message, exit code 2, nothing written."""

import subprocess
import sys

import pytest

from conftest import REPO
from lte.cli import train_main
from lte.config import available_recipes, load_recipe

SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_the_required_recipes_are_shipped():
    assert {"tiny", "llama2", "qwen2"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_validates_and_says_how_to_run_it(name):
    text = (REPO / "recipes" / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"recipe={name}" in line for line in header), "the header comment must show the command"
    recipe = load_recipe([f"recipe={name}"], check_hardware=False)
    cpu = {"use_cpu": True, "bf16": False, "fp16": False}
    for stage in ("stage0", "stage1", "stage2"):
        stage_args = recipe.stage_args(stage, **cpu)
        assert stage_args.output_dir.endswith(stage)
        assert stage_args.max_steps == getattr(recipe.lte, f"{stage}_steps")
    assert recipe.stage_args("stage1", **cpu).lte_mode == "soft" and recipe.stage_args("stage2", **cpu).lte_mode == "hard"
    assert recipe.stage_args("stage0", **cpu).distill_weight == 0.0  # stage 0 is the dense fine-tune: no teacher


def test_overrides_merge_into_typed_fields():
    recipe = load_recipe(["recipe=tiny", "lte.eta=2.5", "train.learning_rate=3e-4", "train.stage2.learning_rate=1e-3",
                          "output_dir=/tmp/somewhere", "data.block_size=128"])
    assert recipe.lte.eta == 2.5 and recipe.data.block_size == 128 and recipe.output_dir == "/tmp/somewhere"
    assert recipe.stage_args("stage1").learning_rate == 3e-4
    assert recipe.stage_args("stage2").learning_rate == 1e-3
    assert recipe.stage_args("stage2").eta == 2.5  # LTE fields reach the training arguments


BAD = [
    (["recipe=nope"], "unknown recipe 'nope'; available recipes: " + ", ".join(available_recipes())),
    (["recipe=tiny", "lte.etta=1"], "did you mean 'lte.eta'"),
    (["recipe=tiny", "train.learnng_rate=1e-4"], "did you mean 'train.learning_rate'"),
    (["recipe=tiny", "modle.dtype=float32"], "did you mean 'model'"),
    (["recipe=tiny", "lte.eta=abc"], "bad value for 'lte.eta'"),
    (["recipe=tiny", "lte.eta=-1"], "lte.eta=-1.0 must be >= 0"),
    (["recipe=tiny", "lte.tau=1.5"], "lte.tau=1.5 must lie in (0, 1)"),
    (["recipe=tiny", "lte.expert_size=5"], "lte.expert_size=5 does not divide the FFN width 172"),
    (["recipe=tiny", "data.train=missing/stories.jsonl"], "data.train=missing/stories.jsonl: file not found"),
    (["recipe=tiny", "model.name_or_path=./no-model-here"], "model.name_or_path=./no-model-here: no model there"),
    (["recipe=tiny", "train.max_steps=5"], "use lte.stage0_steps / lte.stage1_steps / lte.stage2_steps"),
    (["recipe=tiny", "eta=1"], "unknown recipe key 'eta'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD])
def test_bad_input_is_one_clear_message_and_nothing_is_written(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(argv + [f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "recipe=tiny", "lte.tau=0", f"output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "lte.tau=0.0 must lie in (0, 1)" in proc.stderr
    assert not out.exists()


CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_accelerate_config_loads_and_says_how_to_run_it(path):
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"--config_file accelerate_configs/{path.name}" in line for line in header)
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((REPO / ds_file).read_text())
        zero = ds["zero_optimization"]
        # the Trainer fills these from the recipe, so a recipe change cannot disagree with the JSON
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        assert ds["bf16"]["enabled"] == "auto" and ds["gradient_clipping"] == "auto"
        assert config.deepspeed_config["zero3_init_flag"] == (zero["stage"] == 3)
        if zero["stage"] == 3:  # finished stages are gathered into one checkpoint
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "ddp", "fsdp2", "zero2", "zero3", "zero3_offload", "two_node"}
