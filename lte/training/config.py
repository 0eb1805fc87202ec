"""Recipes: a YAML file plus ``key=value`` overrides, validated into typed dataclasses.

``recipe=tiny lte.eta=1.0 train.max_steps=20`` loads ``recipes/tiny.yaml``, merges the
dotted overrides with OmegaConf, and checks every key before anything runs: an unknown key
names the closest valid one, a wrong type or an out-of-range value names the key and why.
Groups: ``model.*``, ``data.*``, ``lte.*`` (:class:`~lte.training.arguments.LTEArguments`), ``lora.*``, ``train.*``
(any ``TrainingArguments`` field, with per-stage overrides under ``train.stage0/1/2``),
``export.*``, and the top-level ``output_dir``, ``seed``, ``target_sparsity`` (sets ``lte.target_sparsity``
and ``export.target_sparsity``: a run trained and exported for one sparsity) and ``reuse_from`` (another
run whose finished stage 0 and prepare step this run takes, :func:`lte.pipeline.reused_stages`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..core.errors import UsageError, rename_deprecated_keys, warn_deprecated
from ..core.run_dir import recipe_file, stage_dir
from .arguments import LTEArguments, LTETrainingArguments
from .export_args import ExportArgs

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
STAGES = ("stage0", "stage1", "stage2")
# A stage is a training phase; its routing is how the LTE layers run their FFNs in it (lte.model.layers.ROUTINGS).
ROUTING_OF_STAGE = {"stage0": "dense", "stage1": "soft", "stage2": "hard"}
# Set per stage by the pipeline; a recipe may not set them.
PIPELINE_OWNED_TRAIN_KEYS = (
    "output_dir",
    "lte_routing",
    "max_steps",
    *(f.name for f in dataclasses.fields(LTEArguments)),
)


@dataclass
class ModelArgs:
    """The model to fine-tune."""

    name_or_path: str = field(default="", metadata={"help": "Local directory or hub name of a causal LM."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager, sdpa, flash_attention_2, ...; default (null): what transformers picks for the architecture."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let transformers run the model's own code from its repository."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    ffn_layout: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "The FFN layout where detection cannot settle it: {first: [gate_proj, up_proj], down: down_proj, "
            "cluster_on: gate_proj, fused_chunks: 1}, or one such entry per host class name."
        },
    )

    def validate(self) -> None:
        if not self.name_or_path:
            raise UsageError("model.name_or_path is empty: set it to a local model directory or a hub name")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise UsageError(f"model.dtype={self.dtype!r} must be one of float32, bfloat16, float16, auto")
        if self.ffn_layout is not None:
            from ..model.registry import FFNSpec

            single = "first" in self.ffn_layout or "down" in self.ffn_layout
            entries = [self.ffn_layout] if single else list(self.ffn_layout.values())
            try:
                for entry in entries:
                    if not isinstance(entry, dict):
                        raise ValueError(f"expected a mapping with first/down, got {entry!r}")
                    FFNSpec.from_dict(entry)
            except (ValueError, TypeError) as exc:
                raise UsageError(
                    f"model.ffn_layout: {exc}; example: model.ffn_layout='{{first: [gate_proj, up_proj], "
                    f"down: down_proj, cluster_on: gate_proj}}' (or {{MyMLP: {{first: [...], down: ...}}}})"
                ) from None


@dataclass
class DataArgs:
    """The training and held-out text, and how it is cut into blocks."""

    train: str = field(
        default="",
        metadata={
            "help": "Training data: a .txt/.json/.jsonl/.csv/.parquet file or a hub "
            "dataset name; several, separated by commas, are concatenated."
        },
    )
    eval: str | None = field(
        default=None, metadata={"help": "Held-out data (file or hub name); default: eval_fraction of train."}
    )
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split of a hub dataset to train on."})
    eval_split: str = field(
        default="validation", metadata={"help": "Split of a hub dataset held out (when `eval` names one)."}
    )
    format: str = field(default="text", metadata={"help": "text (causal-LM packing) or instruction (alpaca-style)."})
    text_field: str = field(
        default="text", metadata={"help": "Column holding the text (json/jsonl/csv/parquet/hub data)."}
    )
    sample_by: str = field(
        default="paragraph", metadata={"help": "How a .txt file splits into documents: line, paragraph, document."}
    )
    instruction_field: str = field(
        default="instruction", metadata={"help": "Instruction column (format: instruction)."}
    )
    input_field: str = field(default="input", metadata={"help": "Optional input column (format: instruction)."})
    response_field: str = field(
        default="output", metadata={"help": "Response column, the only tokens trained on (format: instruction)."}
    )
    block_size: int = field(
        default=512, metadata={"help": "Tokens per packed training block (text) or max length (instruction)."}
    )
    eval_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per held-out block (default: block_size): "
            "evaluate at the context you serve, train on shorter blocks where attention dominates a step."
        },
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of train documents held out when `eval` is not given."}
    )
    max_train_tokens: int | None = field(default=None, metadata={"help": "Cap on training tokens (null: all)."})
    max_eval_tokens: int | None = field(default=None, metadata={"help": "Cap on held-out tokens (null: all)."})
    unmarked_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of training documents packed without "
            "their opening marker (BOS), so the model and its routers also learn text that follows "
            "an EOS directly (the `</s> doc` layout); chosen per document by a hash of its text."
        },
    )
    layout_sample_by: str | None = field(
        default=None,
        metadata={
            "help": "How the held-out layouts (<s> doc, </s> doc, "
            "packed) split a .txt `eval` file into documents (default: sample_by)."
        },
    )

    def validate(self) -> None:
        if not self.train:
            raise UsageError("data.train is empty: set it to a data file or a hub dataset name")
        if self.format not in ("text", "instruction"):
            raise UsageError(f"data.format={self.format!r} must be 'text' or 'instruction'")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise UsageError(f"data.sample_by={self.sample_by!r} must be line, paragraph or document")
        if not 0 <= self.unmarked_fraction <= 1:
            raise UsageError(f"data.unmarked_fraction={self.unmarked_fraction} must lie in [0, 1]")
        if self.layout_sample_by not in (None, "line", "paragraph", "document"):
            raise UsageError(
                f"data.layout_sample_by={self.layout_sample_by!r} must be line, paragraph, document or null"
            )
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


ALL_EXPERTS = "all-experts"  # lora.target_parameters: every routed experts module's weights


@dataclass
class LoraArgs:
    """LoRA / QLoRA (PEFT) instead of full fine-tuning; off while ``r`` is 0.

    Adapters go on every linear projection (attention and FFN) and on MoE models' routed experts
    (their 3-D weights, PEFT ``target_parameters``); the LTE routers are always trained in full (PEFT
    ``modules_to_save``) and kept in float32; the model's own MoE routers are never adapted. Each
    stage's adapter is merged into an unquantized copy of its starting model, so every stage (and the
    export) is a plain LTE model.
    """

    r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights (the paper's setting)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module name suffixes to adapt; 'all-linear': every linear layer but the LM head and the routers."
        },
    )
    target_parameters: list[str] = field(
        default_factory=lambda: [ALL_EXPERTS],
        metadata={
            "help": f"3-D weights to adapt (PEFT target_parameters); '{ALL_EXPERTS}': the up and down weights of "
            "every routed experts module (MoE models; none on dense ones); [] leaves the experts frozen. LoRA on "
            "them has no dropout (lora.dropout=0). Under QLoRA they stay in the dtype they were loaded in "
            "(bitsandbytes quantizes linear layers only)."
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the frozen base weights in 4-bit (bitsandbytes)."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "QLoRA: quantize the quantization constants too."}
    )

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self) -> None:
        if self.r < 0:
            raise UsageError(f"lora.r={self.r} must be >= 0 (0 turns LoRA off)")
        if self.load_in_4bit and not self.enabled:
            raise UsageError(
                "lora.load_in_4bit=true needs lora.r > 0: a 4-bit base model is trained through LoRA adapters"
            )
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UsageError(f"lora.bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} must be 'nf4' or 'fp4'")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules:
            raise UsageError(
                "lora.target_modules is empty; use [all-linear] or module name suffixes such as [q_proj, v_proj]"
            )


@dataclass
class Recipe:
    model: ModelArgs
    data: DataArgs
    lte: LTEArguments
    train: dict[str, Any]
    export: ExportArgs
    output_dir: str = field(
        metadata={
            "help": "Where the run is written (stage0/, prepare/, stage1/, stage2/, export/, "
            "the report); rerunning with the same output_dir resumes."
        }
    )
    lora: LoraArgs = field(default_factory=LoraArgs)
    seed: int = field(default=42, metadata={"help": "Random seed (data order, expert grouping, routers)."})
    name: str = ""
    # One key for a run trained for a sparsity: fills lte.target_sparsity and export.target_sparsity (see SHORTHANDS).
    target_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Train and export for this FFN sparsity, in "
            "(0, 1): sets lte.target_sparsity and export.target_sparsity where they are not set."
        },
    )
    # A finished run whose stage0/ and prepare/ this run takes (hard links) when the settings they depend on agree.
    reuse_from: str | None = field(
        default=None,
        metadata={
            "help": "A finished run whose stage 0 and expert grouping "
            "(prepare/) this run takes, when the settings they depend on agree."
        },
    )

    def stage_args(self, stage: str, **extra) -> LTETrainingArguments:
        """The ``TrainingArguments`` of one stage: ``train.*`` merged with ``train.<stage>.*``."""
        values = {k: v for k, v in self.train.items() if k not in STAGES}
        values.update(self.train.get(stage) or {})
        values.update(dataclasses.asdict(self.lte))
        if stage == "stage0":  # the dense fine-tune: no routers, and the teacher would be the model itself
            values.update(distill_weight=0.0, distill_hidden_weight=0.0)
        values.update(
            output_dir=str(stage_dir(self.output_dir, stage)),
            lte_routing=ROUTING_OF_STAGE[stage],
            max_steps=getattr(self.lte, f"{stage}_steps"),
            seed=self.seed,
            **extra,
        )
        return LTETrainingArguments(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output_dir": self.output_dir,
            "seed": self.seed,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "lte": dataclasses.asdict(self.lte),
            "lora": dataclasses.asdict(self.lora),
            "train": self.train,
            "export": dataclasses.asdict(self.export),
            "target_sparsity": self.target_sparsity,
            "reuse_from": self.reuse_from,
        }


_GROUPS = {"model": ModelArgs, "data": DataArgs, "lte": LTEArguments, "lora": LoraArgs, "export": ExportArgs}
_TOP_LEVEL = ("model", "data", "lte", "lora", "train", "export", "output_dir", "seed", "target_sparsity", "reuse_from")
# Top-level keys that stand for several group keys. Each is expanded within the layer that sets it (the
# recipe file, then the command line) where that layer does not set the group key itself: so
# `recipe=tiny target_sparsity=0.7` overrides both targets of tiny.yaml, and an explicit
# `lte.target_sparsity=0.72` beside it wins for that key.
SHORTHANDS = {"target_sparsity": ("lte", "export")}
_TRAIN_KEYS = {f.name for f in dataclasses.fields(LTETrainingArguments)} - set(PIPELINE_OWNED_TRAIN_KEYS)


def __getattr__(name: str):
    if name == "MODE_OF_STAGE":  # the old name, for one release
        warn_deprecated("lte.training.config.MODE_OF_STAGE", "ROUTING_OF_STAGE")
        return ROUTING_OF_STAGE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    raise UsageError(
        f"unknown recipe {name!r}; available recipes: {', '.join(available_recipes()) or 'none'} "
        f"(or pass recipe=path/to/file.yaml)"
    )


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _check_shapes(cfg: DictConfig) -> None:
    """Groups are mappings, ``train.stageN`` too: ``lte: 5`` or ``train.stage1=5`` names the key."""
    for group in (*_GROUPS, "train"):
        if cfg.get(group) is not None and not isinstance(cfg.get(group), DictConfig):
            raise UsageError(
                f"recipe key '{group}' must be a mapping of {group}.* settings, got {cfg.get(group)!r}; "
                f"write e.g. {group}.KEY=VALUE"
            )
    train = cfg.get("train") or {}
    for stage in STAGES:
        if train.get(stage) is not None and not isinstance(train.get(stage), DictConfig):
            raise UsageError(
                f"train.{stage} must be a mapping of that stage's TrainingArguments, got {train.get(stage)!r}; "
                f"write e.g. train.{stage}.learning_rate=1e-4"
            )
    seed, output_dir = cfg.get("seed"), cfg.get("output_dir")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UsageError(f"seed={seed!r} must be an integer; write e.g. seed=42")
    if isinstance(output_dir, (DictConfig, ListConfig)):
        raise UsageError(f"output_dir={output_dir} must be a path; write e.g. output_dir=runs/NAME")


# Ranges of TrainingArguments values that the Trainer would only trip over mid-run (or never: no
# checkpoint at save_steps=0). Types come from the dataclass annotations (:func:`_check_train_value`).
TRAIN_RANGES: dict[str, tuple[str, float, str]] = {  # key: (comparison, bound, an example of a good value)
    "per_device_train_batch_size": (">=", 1, "8"),
    "per_device_eval_batch_size": (">=", 1, "8"),
    "gradient_accumulation_steps": (">=", 1, "1"),
    "learning_rate": (">=", 0, "1e-4"),
    "weight_decay": (">=", 0, "0.0"),
    "warmup_steps": (">=", 0, "0"),
    "warmup_ratio": (">=", 0, "0.0"),
    "max_grad_norm": (">=", 0, "1.0"),
    "num_train_epochs": (">", 0, "1"),
    "save_steps": (">", 0, "100"),
    "logging_steps": (">", 0, "10"),
    "eval_steps": (">", 0, "100"),
    "save_total_limit": (">=", 1, "2"),
    "adam_epsilon": (">", 0, "1e-8"),
    "dataloader_num_workers": (">=", 0, "0"),
}
_TRAIN_HINTS = typing.get_type_hints(LTETrainingArguments)


def _scalar_types(annotation) -> set[type] | None:
    """The scalar types an annotation admits (``float | None`` -> {float, NoneType}); None when it
    admits anything else too (enums, lists, dicts), which TrainingArguments then checks itself."""
    parts = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    admitted = set()
    for part in parts:
        if part in (int, float, bool, str, type(None)):
            admitted.add(part)
        else:
            return None
    return admitted


def _check_train_value(full: str, key: str, value) -> None:
    """One ``train.*`` value against its ``TrainingArguments`` type and :data:`TRAIN_RANGES`."""
    admitted = _scalar_types(_TRAIN_HINTS.get(key))
    if admitted is not None:
        names = " or ".join(_TYPE_NAMES[t] for t in admitted)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (
            type(value) in admitted
            or (number and isinstance(value, int) and float in admitted)
            or (number and str in admitted)
        )  # run_name=123 is a name; the YAML made it a number
        if not ok:
            raise UsageError(f"{full}={value!r} must be {names}; fix the value (e.g. {full}={_example(admitted)})")
    bound = TRAIN_RANGES.get(key)
    if bound is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        op, limit, example = bound
        if not math.isfinite(value) or (value < limit if op == ">=" else value <= limit):
            raise UsageError(f"{full}={value} must be {op} {limit}; set a value in range (e.g. {full}={example})")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _example(admitted: set[type]) -> str:
    return "1e-4" if float in admitted else "8" if int in admitted else "true" if bool in admitted else "NAME"


def _check_keys(cfg: DictConfig) -> None:
    """Reject unknown keys with the closest valid one, before any type conversion."""
    for key in cfg:
        if key not in _TOP_LEVEL:
            raise UsageError(f"unknown recipe key {key!r}" + _closest(str(key), _TOP_LEVEL))
    for group, schema in _GROUPS.items():
        valid = {f.name for f in dataclasses.fields(schema)}
        for key in cfg.get(group) or {}:
            if key not in valid:
                raise UsageError(
                    f"unknown key '{group}.{key}'" + _closest(f"{group}.{key}", {f"{group}.{v}" for v in valid})
                )
    train = cfg.get("train") or {}
    for key in train:
        scope = [train[key]] if key in STAGES else []
        if key not in STAGES:
            _check_train_key(f"train.{key}", str(key))
            _check_train_value(f"train.{key}", str(key), train[key])
        for stage_cfg in scope:
            for sub in stage_cfg or {}:
                _check_train_key(f"train.{key}.{sub}", str(sub))
                _check_train_value(f"train.{key}.{sub}", str(sub), stage_cfg[sub])


def _check_train_key(full: str, key: str) -> None:
    if key in PIPELINE_OWNED_TRAIN_KEYS:
        where = (
            "the top-level output_dir"
            if key == "output_dir"
            else (
                "lte.stage0_steps / lte.stage1_steps / lte.stage2_steps"
                if key == "max_steps"
                else "the lte group"
                if key != "lte_routing"
                else "the stage (it is fixed per stage)"
            )
        )
        raise UsageError(f"{full} is set by the pipeline; use {where} instead")
    if key not in _TRAIN_KEYS:
        raise UsageError(
            f"unknown key '{full}' (not a TrainingArguments field)"
            + _closest(f"train.{key}", {f"train.{k}" for k in _TRAIN_KEYS})
        )


def expand_shorthands(layer: DictConfig) -> DictConfig:
    """Fill the group keys a top-level shorthand stands for, where ``layer`` leaves them unset."""
    for key, groups in SHORTHANDS.items():
        if layer.get(key) is None:
            continue
        for group in groups:
            existing = layer.get(group)
            if existing is not None and not isinstance(existing, DictConfig):
                continue  # a malformed group (`lte: 5`): the shape check names it
            if key not in (existing or {}):
                OmegaConf.update(layer, f"{group}.{key}", layer[key], force_add=True)
    return layer


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
    base = read_recipe_file(path)
    try:
        cfg = OmegaConf.merge(
            expand_shorthands(rename_deprecated_keys(base)),
            expand_shorthands(rename_deprecated_keys(OmegaConf.from_dotlist(overrides))),
        )
    except OmegaConfBaseException as exc:
        raise UsageError(
            f"could not apply the overrides {' '.join(overrides)} to recipe {path}: "
            f"{str(exc).splitlines()[0]}; write them as dotted key=value"
        ) from None
    return build_recipe(cfg, path.stem, check_hardware)


def read_recipe_file(path: Path) -> DictConfig:
    """A recipe YAML as a mapping; a file that does not parse, or is not a mapping, names the fix."""
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"recipe {path} is not valid YAML ({first}); fix the file (compare recipes/tiny.yaml)"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}; check the path and its permissions") from None
    if isinstance(cfg, ListConfig) or not isinstance(cfg, DictConfig):
        raise UsageError(
            f"recipe {path} must be a YAML mapping (key: value lines such as output_dir: runs/NAME), "
            f"not a list; fix the file (compare recipes/tiny.yaml)"
        )
    return cfg


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The recipe a training run used (``RUN_DIR/recipe.yaml``, written by the pipeline)."""
    path = recipe_file(run_dir)
    if not path.is_file():
        raise UsageError(f"{run_dir} has no recipe.yaml; give the output_dir of an `lte train` run")
    cfg = rename_deprecated_keys(read_recipe_file(path), warn=False)  # written by the pipeline, maybe before a rename
    name = str(cfg.pop("name", "") or path.parent.name)
    return build_recipe(cfg, name, check_hardware=False)


def _top_level_extras(cfg: DictConfig) -> dict[str, Any]:
    """``target_sparsity`` and ``reuse_from``, typed and checked."""
    target, reuse = cfg.get("target_sparsity"), cfg.get("reuse_from")
    if target is not None:
        try:
            target = float(target)
        except (TypeError, ValueError):
            raise UsageError(
                f"target_sparsity={target!r} must be a number in (0, 1), e.g. target_sparsity=0.7"
            ) from None
        if not 0 < target < 1:
            raise UsageError(
                f"target_sparsity={target} must lie in (0, 1): it sets lte.target_sparsity and export.target_sparsity"
            )
    return {"target_sparsity": target, "reuse_from": str(reuse) if reuse else None}


def build_recipe(cfg: DictConfig, name: str, check_hardware: bool = True) -> Recipe:
    """Check and type a merged recipe config."""
    _check_shapes(cfg)
    rename_deprecated_keys(cfg)
    _check_keys(cfg)
    extras = _top_level_extras(cfg)
    expand_shorthands(cfg)
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
    recipe = Recipe(
        model=groups["model"],
        data=groups["data"],
        lte=groups["lte"],
        train=train,
        export=groups["export"],
        output_dir=str(cfg.output_dir),
        seed=int(cfg.get("seed", 42)),
        name=name,
        lora=groups["lora"],
        **extras,
    )
    if recipe.reuse_from and Path(recipe.reuse_from).resolve() == Path(recipe.output_dir).resolve():
        raise UsageError(f"reuse_from={recipe.reuse_from} is this run's own output_dir; give another run's output_dir")
    for part in (recipe.model, recipe.data, recipe.lte, recipe.lora, recipe.export):
        part.validate()
    if recipe.lora.enabled and recipe.lte.stage0_steps > 0:
        raise UsageError(
            "lte.stage0_steps > 0 with lora.r > 0 is not supported: run the dense fine-tune without LoRA "
            "first and point model.name_or_path at its output, or set lte.stage0_steps=0"
        )
    for stage in STAGES:
        try:
            recipe.stage_args(stage, **({} if check_hardware else {"use_cpu": True, "bf16": False, "fp16": False}))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid train settings for {stage}: {exc}") from None
    return recipe
