"""Recipes: a YAML file plus ``key=value`` overrides, validated into typed dataclasses.

``recipe=tiny lte.eta=1.0 train.max_steps=20`` loads ``recipes/tiny.yaml``, merges the
dotted overrides with OmegaConf, and checks every key before anything runs: an unknown key
names the closest valid one, a wrong type or an out-of-range value names the key and why.
Groups: ``model.*``, ``data.*``, ``lte.*`` (:class:`~lte.trainer.LTEArguments`), ``lora.*``, ``train.*``
(any ``TrainingArguments`` field, with per-stage overrides under ``train.stage0/1/2``),
``export.*``, and the top-level ``output_dir`` and ``seed``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UsageError
from .trainer import LTEArguments, LTETrainingArguments

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGES = ("stage0", "stage1", "stage2")
MODE_OF_STAGE = {"stage0": "dense", "stage1": "soft", "stage2": "hard"}
# Set per stage by the pipeline; a recipe may not set them.
PIPELINE_OWNED_TRAIN_KEYS = ("output_dir", "lte_mode", "max_steps", *(f.name for f in dataclasses.fields(LTEArguments)))


@dataclass
class ModelArgs:
    name_or_path: str = field(default="", metadata={"help": "Local directory or hub name of a causal LM."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    trust_remote_code: bool = False
    revision: str | None = None

    def validate(self) -> None:
        if not self.name_or_path:
            raise UsageError("model.name_or_path is empty: set it to a local model directory or a hub name")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise UsageError(f"model.dtype={self.dtype!r} must be one of float32, bfloat16, float16, auto")


@dataclass
class DataArgs:
    train: str = field(default="", metadata={"help": "Training data: a .txt/.json/.jsonl/.csv/.parquet file or a hub "
                                                   "dataset name; several, separated by commas, are concatenated."})
    eval: str | None = field(default=None, metadata={"help": "Held-out data (file or hub name); default: eval_fraction of train."})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = "train"
    eval_split: str = "validation"
    format: str = field(default="text", metadata={"help": "text (causal-LM packing) or instruction (alpaca-style)."})
    text_field: str = "text"
    sample_by: str = field(default="paragraph", metadata={"help": "How a .txt file splits into documents: line, paragraph, document."})
    instruction_field: str = "instruction"
    input_field: str = "input"
    response_field: str = "output"
    block_size: int = field(default=512, metadata={"help": "Tokens per packed training block (text) or max length (instruction)."})
    eval_block_size: int | None = field(default=None, metadata={"help": "Tokens per held-out block (default: block_size): "
                                        "evaluate at the context you serve, train on shorter blocks where attention dominates a step."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of train documents held out when `eval` is not given."})
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None
    layout_sample_by: str | None = field(default=None, metadata={"help": "How the held-out layouts (<s> doc, </s> doc, "
                                         "packed) split a .txt `eval` file into documents (default: sample_by)."})

    def validate(self) -> None:
        if not self.train:
            raise UsageError("data.train is empty: set it to a data file or a hub dataset name")
        if self.format not in ("text", "instruction"):
            raise UsageError(f"data.format={self.format!r} must be 'text' or 'instruction'")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise UsageError(f"data.sample_by={self.sample_by!r} must be line, paragraph or document")
        if self.layout_sample_by not in (None, "line", "paragraph", "document"):
            raise UsageError(f"data.layout_sample_by={self.layout_sample_by!r} must be line, paragraph, document or null")
        if self.block_size < 2:
            raise UsageError(f"data.block_size={self.block_size} must be >= 2")
        if self.eval_block_size is not None and self.eval_block_size < 2:
            raise UsageError(f"data.eval_block_size={self.eval_block_size} must be >= 2 (or null: data.block_size)")
        if not 0 < self.eval_fraction < 1:
            raise UsageError(f"data.eval_fraction={self.eval_fraction} must lie in (0, 1)")
        for key, block_key in (("max_train_tokens", "block_size"), ("max_eval_tokens", "held_out_block_size")):
            value, block = getattr(self, key), getattr(self, block_key)
            if value is not None and value < block:
                raise UsageError(f"data.{key}={value} must be at least one block ({block} tokens)")

    @property
    def held_out_block_size(self) -> int:
        """Tokens per held-out block."""
        return self.eval_block_size or self.block_size


@dataclass
class LoraArgs:
    """LoRA / QLoRA (PEFT) instead of full fine-tuning; off while ``r`` is 0.

    Adapters go on every linear projection (attention and FFN); the routers are always trained
    in full (PEFT ``modules_to_save``) and kept in float32. Each stage's adapter is merged into
    an unquantized copy of its starting model, so every stage (and the export) is a plain LTE model.
    """

    r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights (the paper's setting)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                      metadata={"help": "Module name suffixes to adapt; 'all-linear': every linear layer but the LM head."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the frozen base weights in 4-bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = True

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self) -> None:
        if self.r < 0:
            raise UsageError(f"lora.r={self.r} must be >= 0 (0 turns LoRA off)")
        if self.load_in_4bit and not self.enabled:
            raise UsageError("lora.load_in_4bit=true needs lora.r > 0: a 4-bit base model is trained through LoRA adapters")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UsageError(f"lora.bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} must be 'nf4' or 'fp4'")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules:
            raise UsageError("lora.target_modules is empty; use [all-linear] or module name suffixes such as [q_proj, v_proj]")


@dataclass
class ExportArgs:
    """The export stage after training (``lte export`` with the same options); off unless
    ``target_sparsity`` or ``max_ppl_increase`` is set."""

    target_sparsity: float | None = field(default=None, metadata={"help": "FFN sparsity the export tunes thresholds to hit."})
    max_ppl_increase: float | None = field(default=None, metadata={"help": "Or: the highest sparsity within this % of calibration ppl."})
    allocation: str = field(default="tuned", metadata={"help": "tuned (per-layer, by sensitivity) or uniform."})
    calibration: str | None = field(default=None, metadata={"help": "Calibration text file; default: the training data."})
    calibration_tokens: int = field(default=32768, metadata={"help": "Calibration tokens."})
    out: str | None = field(default=None, metadata={"help": "Export directory; default OUTPUT_DIR/export."})

    @property
    def enabled(self) -> bool:
        return self.target_sparsity is not None or self.max_ppl_increase is not None

    def validate(self) -> None:
        if self.target_sparsity is not None and self.max_ppl_increase is not None:
            raise UsageError("set only one of export.target_sparsity and export.max_ppl_increase")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise UsageError(f"export.target_sparsity={self.target_sparsity} must lie in [0, 1)")
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise UsageError(f"export.max_ppl_increase={self.max_ppl_increase} must be a positive percentage")
        if self.allocation not in ("tuned", "uniform"):
            raise UsageError(f"export.allocation={self.allocation!r} must be 'tuned' or 'uniform'")
        if self.calibration_tokens < 1:
            raise UsageError(f"export.calibration_tokens={self.calibration_tokens} must be positive")


@dataclass
class Recipe:
    model: ModelArgs
    data: DataArgs
    lte: LTEArguments
    train: dict[str, Any]
    export: ExportArgs
    output_dir: str
    lora: LoraArgs = field(default_factory=LoraArgs)
    seed: int = 42
    name: str = ""

    def stage_args(self, stage: str, **extra) -> LTETrainingArguments:
        """The ``TrainingArguments`` of one stage: ``train.*`` merged with ``train.<stage>.*``."""
        values = {k: v for k, v in self.train.items() if k not in STAGES}
        values.update(self.train.get(stage) or {})
        values.update(dataclasses.asdict(self.lte))
        if stage == "stage0":  # the dense fine-tune: no routers, and the teacher would be the model itself
            values.update(distill_weight=0.0, distill_hidden_weight=0.0)
        values.update(output_dir=os.path.join(self.output_dir, stage), lte_mode=MODE_OF_STAGE[stage],
                      max_steps=getattr(self.lte, f"{stage}_steps"), seed=self.seed, **extra)
        return LTETrainingArguments(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "output_dir": self.output_dir, "seed": self.seed,
                "model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "lte": dataclasses.asdict(self.lte), "lora": dataclasses.asdict(self.lora), "train": self.train,
                "export": dataclasses.asdict(self.export)}


_GROUPS = {"model": ModelArgs, "data": DataArgs, "lte": LTEArguments, "lora": LoraArgs, "export": ExportArgs}
_TOP_LEVEL = ("model", "data", "lte", "lora", "train", "export", "output_dir", "seed")
_TRAIN_KEYS = {f.name for f in dataclasses.fields(LTETrainingArguments)} - set(PIPELINE_OWNED_TRAIN_KEYS)


def recipe_dirs() -> list[Path]:
    return [Path.cwd() / "recipes", REPO_RECIPES]


def available_recipes() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_recipe(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        if Path(name).is_file():
            return Path(name)
        raise UsageError(f"recipe file {name} does not exist")
    for directory in recipe_dirs():
        path = directory / f"{name}.yaml"
        if path.is_file():
            return path
    raise UsageError(f"unknown recipe {name!r}; available recipes: {', '.join(available_recipes()) or 'none'} "
                     f"(or pass recipe=path/to/file.yaml)")


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _check_keys(cfg: DictConfig) -> None:
    """Reject unknown keys with the closest valid one, before any type conversion."""
    for key in cfg:
        if key not in _TOP_LEVEL:
            raise UsageError(f"unknown recipe key {key!r}" + _closest(str(key), _TOP_LEVEL))
    for group, schema in _GROUPS.items():
        valid = {f.name for f in dataclasses.fields(schema)}
        for key in cfg.get(group) or {}:
            if key not in valid:
                raise UsageError(f"unknown key '{group}.{key}'" + _closest(f"{group}.{key}", {f"{group}.{v}" for v in valid}))
    train = cfg.get("train") or {}
    for key in train:
        scope = [train[key]] if key in STAGES else []
        if key not in STAGES:
            _check_train_key(f"train.{key}", str(key))
        for stage_cfg in scope:
            for sub in stage_cfg or {}:
                _check_train_key(f"train.{key}.{sub}", str(sub))


def _check_train_key(full: str, key: str) -> None:
    if key in PIPELINE_OWNED_TRAIN_KEYS:
        where = "the top-level output_dir" if key == "output_dir" else (
            "lte.stage0_steps / lte.stage1_steps / lte.stage2_steps" if key == "max_steps" else
            "the lte group" if key != "lte_mode" else "the stage (it is fixed per stage)")
        raise UsageError(f"{full} is set by the pipeline; use {where} instead")
    if key not in _TRAIN_KEYS:
        raise UsageError(f"unknown key '{full}' (not a TrainingArguments field)"
                         + _closest(f"train.{key}", {f"train.{k}" for k in _TRAIN_KEYS}))


def parse_overrides(args: list[str]) -> tuple[str, list[str]]:
    """Split ``recipe=NAME`` from the other ``key=value`` arguments."""
    args = [a for a in args if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    recipe = None
    rest = []
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"expected key=value, got {arg!r} (example: recipe=tiny lte.eta=1.0)")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            rest.append(arg)
    if recipe is None:
        raise UsageError(f"no recipe given: pass recipe=NAME (available: {', '.join(available_recipes())})")
    return recipe, rest


def load_recipe(args: list[str], check_hardware: bool = True) -> Recipe:
    """Build a validated :class:`Recipe` from ``["recipe=NAME", "key=value", ...]``.

    ``check_hardware=False`` validates every key and value without asking whether this machine
    can run them (a bf16 GPU recipe on a CPU-only machine), as the recipe tests do.
    """
    name, overrides = parse_overrides(args)
    path = find_recipe(name)
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise UsageError(f"could not read recipe {path} with overrides {overrides}: {exc}") from None
    return build_recipe(cfg, path.stem, check_hardware)


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The recipe a training run used (``RUN_DIR/recipe.yaml``, written by the pipeline)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no recipe.yaml; give the output_dir of an `lte train` run")
    cfg = OmegaConf.load(path)
    name = str(cfg.pop("name", "") or path.parent.name)
    return build_recipe(cfg, name, check_hardware=False)


def build_recipe(cfg: DictConfig, name: str, check_hardware: bool = True) -> Recipe:
    """Check and type a merged recipe config."""
    _check_keys(cfg)
    groups = {}
    for group, schema in _GROUPS.items():
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), cfg.get(group) or {})
            groups[group] = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or group
            raise UsageError(f"bad value for '{group}.{key}': {str(exc).splitlines()[0]}") from None
    if "output_dir" not in cfg or not cfg.output_dir:
        raise UsageError("output_dir is not set: add output_dir=runs/NAME")
    train = OmegaConf.to_container(cfg.get("train") or OmegaConf.create({}), resolve=True)
    recipe = Recipe(model=groups["model"], data=groups["data"], lte=groups["lte"], train=train,
                    export=groups["export"], output_dir=str(cfg.output_dir), seed=int(cfg.get("seed", 42)), name=name,
                    lora=groups["lora"])
    for part in (recipe.model, recipe.data, recipe.lte, recipe.lora, recipe.export):
        part.validate()
    if recipe.lora.enabled and recipe.lte.stage0_steps > 0:
        raise UsageError("lte.stage0_steps > 0 with lora.r > 0 is not supported: run the dense fine-tune without LoRA "
                         "first and point model.name_or_path at its output, or set lte.stage0_steps=0")
    for stage in STAGES:
        try:
            recipe.stage_args(stage, **({} if check_hardware else {"use_cpu": True, "bf16": False, "fp16": False}))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid train settings for {stage}: {exc}") from None
    return recipe
