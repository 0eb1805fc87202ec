"""Every shipped recipe validates and runs on the CPU; bad input gets one clear message, exit code 2,
nothing written."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FAMILY_CONFIGS, REPO, STORIES, TEST_DATA
from lte import UsageError
from lte.cli import train_main
from lte.training.config import STAGES, available_recipes, load_recipe, load_run_recipe
from lte.training.data import ALPACA_CHAT_TEMPLATE
from moe_configs import MOE_CONFIGS

SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
ALPACA = TEST_DATA / "alpaca"


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
    assert (
        recipe.stage_args("stage1", **cpu).lte_routing == "soft"
        and recipe.stage_args("stage2", **cpu).lte_routing == "hard"
    )
    assert recipe.stage_args("stage0", **cpu).distill_weight == 0.0  # stage 0 is the dense fine-tune: no teacher


def test_overrides_merge_into_typed_fields():
    recipe = load_recipe(
        [
            "recipe=tiny",
            "lte.eta=2.5",
            "train.learning_rate=3e-4",
            "train.stage2.learning_rate=1e-3",
            "output_dir=/tmp/somewhere",
            "data.block_size=128",
        ]
    )
    assert recipe.lte.eta == 2.5 and recipe.data.block_size == 128 and recipe.output_dir == "/tmp/somewhere"
    assert recipe.stage_args("stage1").learning_rate == 3e-4
    assert recipe.stage_args("stage2").learning_rate == 1e-3
    assert recipe.stage_args("stage2").eta == 2.5  # LTE fields reach the training arguments


def test_the_old_threshold_key_is_accepted_with_a_warning_for_one_release(tmp_path):
    """lte.tau (before the rename) gives the same recipe as lte.threshold, on the command line, in a
    recipe file, and in the record of a run trained before the rename (which then needs no rerun)."""
    from lte.core.record import changed_keys, read_record, resolve_paths

    new = load_recipe(["recipe=tiny", "lte.threshold=0.4", "output_dir=/tmp/r"], check_hardware=False)
    with pytest.warns(DeprecationWarning, match="lte.tau is deprecated, use lte.threshold"):
        old = load_recipe(["recipe=tiny", "lte.tau=0.4", "output_dir=/tmp/r"], check_hardware=False)
    assert old == new and new.lte.threshold == 0.4 and new.stage_args("stage1", use_cpu=True).threshold == 0.4
    old_file = tmp_path / "old.yaml"
    old_file.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("  threshold: 0.5", "  tau: 0.4"))
    with pytest.warns(DeprecationWarning, match="lte.tau is deprecated"):
        from_file = load_recipe([f"recipe={old_file}", "output_dir=/tmp/r"], check_hardware=False)
    assert from_file.lte == new.lte
    # the override, in the new name, wins over the file's old key
    with pytest.warns(DeprecationWarning, match="lte.tau is deprecated, use lte.threshold"):
        assert load_recipe([f"recipe={old_file}", "lte.threshold=0.3"], check_hardware=False).lte.threshold == 0.3
    with pytest.raises(UsageError, match=r"lte\.tau and lte\.threshold are both set; keep only lte\.threshold"):
        load_recipe(["recipe=tiny", "lte.tau=0.4", "lte.threshold=0.4"], check_hardware=False)
    record = resolve_paths(new).to_dict()
    record["lte"]["tau"] = record["lte"].pop("threshold")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(record))
    assert changed_keys(read_record(tmp_path / "run"), resolve_paths(new).to_dict()) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the run's own record: nothing for the user to fix
        assert load_run_recipe(tmp_path / "run").lte == new.lte


BAD = [
    (["recipe=nope"], "unknown recipe 'nope'; available recipes: " + ", ".join(available_recipes())),
    (["recipe=tiny", "lte.etta=1"], "did you mean 'lte.eta'"),
    (["recipe=tiny", "train.learnng_rate=1e-4"], "did you mean 'train.learning_rate'"),
    (["recipe=tiny", "modle.dtype=float32"], "did you mean 'model'"),
    (["recipe=tiny", "lte.eta=abc"], "bad value for 'lte.eta'"),
    (["recipe=tiny", "lte.eta=-1"], "lte.eta=-1.0 must be >= 0"),
    (["recipe=tiny", "lte.threshold=1.5"], "lte.threshold=1.5 must lie in (0, 1)"),
    (["recipe=tiny", "lte.expert_size=5"], "lte.expert_size=5 does not divide the FFN width 172"),
    (["recipe=tiny", "data.train=missing/stories.jsonl"], "data.train=missing/stories.jsonl: file not found"),
    (["recipe=tiny", "model.name_or_path=./no-model-here"], "model.name_or_path=./no-model-here: no model there"),
    (["recipe=tiny", "train.max_steps=5"], "use lte.stage0_steps / lte.stage1_steps / lte.stage2_steps"),
    (["recipe=tiny", "eta=1"], "unknown recipe key 'eta'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD])
def test_bad_input_is_one_clear_message_and_nothing_is_written(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main([*argv, f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "recipe=tiny", "lte.threshold=0", f"output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "lte.threshold=0.0 must lie in (0, 1)" in proc.stderr
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
        assert (
            config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        )
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "ddp", "fsdp2", "zero2", "zero3", "zero3_offload", "two_node"}


# --- Each recipe runs end to end on the CPU (recipe=tiny is the session's `tiny_run`) ---------------------

# The FFN family of each model a recipe names that is not on this machine (a hub model, or one another
# script writes first): the recipe runs on a tiny random model of that family instead.
MODEL_FAMILY = {
    "meta-llama/Llama-2-7b-hf": "llama",
    "Qwen/Qwen2.5-0.5B": "qwen2",
    "runs/tinystories-llama-4m": "llama",  # written by scripts/pretrain_tinystories_llama.py
    "Qwen/Qwen1.5-MoE-A2.7B": "qwen2_moe",  # tests/moe_configs.py's MOE_CONFIGS
}
# Local data of each format in place of the recipe's (a hub dataset, usually): training file, held-out
# file, and tokens per block (the recipes' 1024 would only make each step longer; an Alpaca prompt needs
# about 100 of stories260K's tokens).
LOCAL_DATA = {
    "text": (REPO / "assets" / "tinystories" / "train.jsonl", REPO / "assets" / "tinystories" / "eval.txt", 64),
    "instruction": (ALPACA / "alpaca_data_500.json", ALPACA / "alpaca_plus_validation_unseen_200.json", 256),
}
# recipe=qwen2_moe runs in tests/training/test_moe_pipeline.py, with these overrides, where its export is checked.
RUN = [p for p in SHIPPED if p not in ("tiny", "qwen2_moe")]


def tiny_model_dir(family: str, expert_size: int, out) -> str:
    """A random two-layer model of ``family`` with stories260K's 512-token tokenizer, its FFN a whole number
    of the recipe's experts (at least four) and wider than the model, as real FFNs are, saved as a local
    checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    config = (FAMILY_CONFIGS[family] if family in FAMILY_CONFIGS else MOE_CONFIGS[family])()
    config.vocab_size = len(tokenizer)
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):  # MoE: each expert
        if getattr(config, key, None):
            setattr(config, key, expert_size * max(4, 2 * config.hidden_size // expert_size + 1))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def cpu_overrides(name: str, tmp_path) -> list[str]:
    """What changes for a CPU run: the device, the model's size (a tiny model of the same family where the
    recipe's model is not here), the data (local files of the recipe's format), the token and step counts.
    Everything else, precision included, is the recipe's own."""
    recipe = load_recipe([f"recipe={name}"], check_hardware=False)
    overrides = ["train.use_cpu=true", f"output_dir={tmp_path / 'run'}"]
    if not (REPO / recipe.model.name_or_path / "config.json").is_file():
        assert recipe.model.name_or_path in MODEL_FAMILY, (
            f"recipe={name}: add its model {recipe.model.name_or_path} to MODEL_FAMILY (the family of its FFN)"
        )
        family = MODEL_FAMILY[recipe.model.name_or_path]
        overrides.append(f"model.name_or_path={tiny_model_dir(family, recipe.lte.expert_size, tmp_path / 'model')}")
    if recipe.train.get("fp16") or recipe.model.dtype == "float16":
        # The CPU has no float16 autocast (PyTorch supports bf16 there): a float16 recipe runs in bfloat16.
        overrides += ["train.fp16=false", "train.bf16=true", "model.dtype=bfloat16"]
    train, held_out, block = LOCAL_DATA[recipe.data.format]
    overrides.append(f"data.train={train}")
    if recipe.data.eval:
        overrides.append(f"data.eval={held_out}")
    overrides += [
        f"data.block_size={block}",
        "data.eval_block_size=null",
        f"data.max_train_tokens={block * 64}",
        f"data.max_eval_tokens={block * 16}",
        "lte.router_init_tokens=1024",
        "lte.router_init_steps=10",
        "train.save_steps=2",
        "train.logging_steps=1",
        "export.calibration_tokens=1024",
    ]
    overrides += [f"lte.{stage}_steps={min(getattr(recipe.lte, f'{stage}_steps'), 2)}" for stage in STAGES]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_every_recipe_trains_and_evaluates_on_the_cpu_in_its_own_precision(name, tmp_path):
    """``python train.py recipe=NAME`` with only the device and the sizes changed (:func:`cpu_overrides`).

    The GPU recipes train in bf16: on the CPU that is bf16 weights plus the Trainer's bf16 autocast. QLoRA
    keeps its 4-bit NF4 base and its paged 8-bit optimizer: the bitsandbytes this project tests with (0.50)
    runs both on the CPU, so nothing is swapped off.
    """
    overrides = cpu_overrides(name, tmp_path)
    proc = subprocess.run(
        [sys.executable, "train.py", f"recipe={name}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = load_recipe([f"recipe={name}", *overrides])
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["sparsity"] < 1 and math.isfinite(report["sparse_ppl"]) and math.isfinite(report["dense_ppl"])
    for stage in STAGES:
        if getattr(recipe.lte, f"{stage}_steps") == 0:
            continue
        checkpoint = out / stage / "checkpoint-2"
        args = torch.load(checkpoint / "training_args.bin", weights_only=False)
        # the recipe's precision and batch, on the CPU
        assert args.use_cpu and (args.bf16, args.fp16) == (recipe.train.get("bf16", False), False)
        assert args.per_device_train_batch_size == recipe.train["per_device_train_batch_size"]
        losses = [
            h["loss"] for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in h
        ]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
        weights = load_file(str(out / stage / "model" / "model.safetensors"))
        dtype = getattr(torch, recipe.model.dtype, None)  # None for "auto": the checkpoint's own
        assert dtype is None or {w.dtype for w in weights.values()} == {dtype}, stage  # saved in the recipe's dtype
    if recipe.lora.enabled:
        assert (out / "stage1" / "adapter" / "adapter_config.json").is_file()
        assert f"LoRA r={recipe.lora.r}" in proc.stderr
        assert ("over a 4-bit base" in proc.stderr) == recipe.lora.load_in_4bit
    if recipe.data.format == "instruction":
        config = json.loads((out / "stage2" / "model" / "tokenizer_config.json").read_text())
        assert config.get("chat_template") == ALPACA_CHAT_TEMPLATE or (
            (out / "stage2" / "model" / "chat_template.jinja").read_text() == ALPACA_CHAT_TEMPLATE
        )
    if recipe.export.enabled:
        exported = json.loads((out / "export" / "lte_export.json").read_text())
        assert abs(exported["heldout_sparsity"] - recipe.export.target_sparsity) < 0.05
