"""A run is a record that cannot lie: ``OUTPUT_DIR/recipe.yaml`` says what every stage there was made with.

The recipe is stored resolved (absolute paths), written when the run starts and rewritten only
when a rerun changes keys whose stages are then rerun. On a rerun, :func:`plan_rerun` compares
the stored recipe with the new one through :data:`KEY_STAGES` (which recipe keys change which
stage's result): a change that reaches a trained stage holding work stops the run before anything
happens, unless ``restart_from=STAGE`` discards that stage and the ones after it; a change that
reaches only the report and the export reruns those; a stage that diverged (``diverged.json``)
restarts when its settings change, since its checkpoints carry the old optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from . import run_dir
from .errors import UsageError, rename_deprecated_keys

STAGE_ORDER = ("stage0", "prepare", "stage1", "stage2", "report", "export")
TRAINED = ("stage0", "prepare", "stage1", "stage2")

_ALL = frozenset(STAGE_ORDER)
_NONE: frozenset[str] = frozenset()
_TRAINING = frozenset({"stage0", "stage1", "stage2"})
# Recipe key (a dotted prefix; the first match wins) -> the stages whose results it changes directly.
# Every later stage is built on an earlier one, so a rerun stage makes all the later ones stale too.
KEY_STAGES: tuple[tuple[str, frozenset[str]], ...] = (
    ("output_dir", _NONE),
    ("target_sparsity", _NONE),  # a shorthand: its effect is in the lte.* and export.* keys it fills
    ("reuse_from", _NONE),  # where finished stages came from; reused_stages checks they match
    ("name", _NONE),
    ("export.", frozenset({"export"})),
    ("data.eval_block_size", frozenset({"report", "export"})),
    ("data.layout_sample_by", frozenset({"report", "export"})),  # how the held-out layouts split the eval file
    ("model.attn_implementation", _NONE),  # the same attention, computed by another kernel
    ("model.ffn_layout", frozenset({"prepare"})),  # read where the experts are grouped
    ("data.max_eval_tokens", frozenset({"report", "export"})),
    ("train.per_device_eval_batch_size", frozenset({"report", "export"})),
    *(
        (f"train.{key}", _NONE)
        for key in (
            "logging_",
            "report_to",
            "save_",
            "disable_tqdm",
            "dataloader_",
            "run_name",
            "eval_",
            "push_to_hub",
            "hub_",
        )
    ),
    ("train.stage0.", frozenset({"stage0"})),
    ("train.stage1.", frozenset({"stage1"})),
    ("train.stage2.", frozenset({"stage2"})),
    (
        "train.per_device_train_batch_size",
        frozenset({"stage0", "prepare", "stage1", "stage2"}),
    ),  # prepare calibrates with it
    ("train.", _TRAINING),
    ("lte.stage0_steps", frozenset({"stage0"})),
    ("lte.stage2_steps", frozenset({"stage2"})),
    *(
        (f"lte.{key}", frozenset({"stage1"}))
        for key in (
            "eta",
            "target_sparsity",
            "lam",
            "sep_eps",
            "efficiency_loss",
            "router_learning_rate",
            "stage1_steps",
        )
    ),
    ("lte.distill_", frozenset({"stage1", "stage2"})),
    ("lte.train_moe_router", frozenset({"stage1", "stage2"})),
    ("lte.", frozenset({"prepare"})),  # expert_size, threshold, router init, k-means: the grouping and routers
    ("lora.", frozenset({"stage1", "stage2"})),
    ("data.", _ALL),
    ("model.", _ALL),
    ("seed", _ALL),
)


def stages_of(key: str) -> frozenset[str]:
    """The stages whose results the recipe key ``key`` (dotted) changes directly."""
    for prefix, stages in KEY_STAGES:
        if key == prefix.rstrip(".") or key.startswith(prefix):
            return stages
    return _ALL  # unknown: assume everything


def heldout_settings(recipe: dict) -> dict[str, Any]:
    """The recipe's keys besides ``export.*`` that change only the held-out figures of the report and
    the export: the export keeps them in its marker, so a change to one redoes the export stage."""
    return {key: value for key, value in flatten(recipe).items() if stages_of(key) == frozenset({"report", "export"})}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


_SCHEMA_GROUPS = ("model.", "data.", "lte.", "lora.", "export.")


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that differs. A key of a fixed group that
    the old record lacks is a field added since it was written (its default keeps the old behaviour)."""
    a, b = flatten(old), flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if k in a or not k.startswith(_SCHEMA_GROUPS)]
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def stage_status(output_dir: Path) -> dict[str, str]:
    """Trained stages holding work: ``finished`` (a model), ``diverged`` or ``partial`` (checkpoints)."""
    status = {}
    for stage in TRAINED:
        if run_dir.is_finished(output_dir, stage):
            status[stage] = "finished"
        elif run_dir.diverged_file(output_dir, stage).is_file():
            status[stage] = "diverged"
        elif run_dir.has_checkpoints(output_dir, stage):
            status[stage] = "partial"
    return status


@dataclasses.dataclass
class RerunPlan:
    """What a rerun does with an existing run directory."""

    changed: dict[str, tuple[Any, Any]]
    discard: list[str]  # trained stages whose outputs are removed before anything runs
    update_record: bool  # recipe.yaml is (re)written

    def describe(self) -> str:
        return ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in self.changed.items())


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value) if not isinstance(value, str) else value


def enabled_stages(recipe: dict) -> set[str]:
    """The stages a recipe (as a dict) runs."""
    lte, export = recipe.get("lte") or {}, recipe.get("export") or {}
    optional = {
        "stage0": bool(lte.get("stage0_steps")),
        "export": export.get("target_sparsity") is not None or export.get("max_ppl_increase") is not None,
    }
    return {stage for stage in STAGE_ORDER if optional.get(stage, True)}


def plan_rerun(old: dict | None, new: dict, status: dict[str, str], restart_from: str | None = None) -> RerunPlan:
    """Decide a rerun; raises :class:`UsageError` when the change would leave finished work that no
    longer matches its record. ``status``: :func:`stage_status` of the run directory."""
    if restart_from is not None and restart_from not in TRAINED:
        raise UsageError(f"restart_from={restart_from} must be one of {', '.join(TRAINED)}")
    changed = changed_keys(old, new) if old is not None else {}
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    enabled = enabled_stages(new)
    stale_from = len(STAGE_ORDER)
    for key in changed:
        reached = [order[s] for s in stages_of(key) if s in status or s in enabled]
        stale_from = min([stale_from, *reached])
    stale = [s for s in TRAINED if order[s] >= stale_from and s in status]
    discard = [s for s in TRAINED if restart_from is not None and order[s] >= order[restart_from] and s in status]
    blocking = [s for s in stale if s not in discard and status[s] != "diverged"]
    if blocking:
        run = new.get("output_dir", "OUTPUT_DIR")
        first = blocking[0]
        raise UsageError(
            f"{run} was trained with other settings; changed: "
            f"{', '.join(f'{k} ({_show(a)} -> {_show(b)})' for k, (a, b) in changed.items() if stages_of(k))}. "
            f"They change {', '.join(blocking)}, "
            f"which {'is' if len(blocking) == 1 else 'are'} already trained there, so "
            f"the run is left as it is. Either give a new output_dir=..., or add restart_from={first} to discard "
            f"{first} and every stage after it and train them with the new settings"
        )
    discard += [s for s in stale if s not in discard]  # diverged stages restart with the new settings
    return RerunPlan(
        changed=changed, discard=sorted(discard, key=order.get), update_record=old is None or bool(changed)
    )


def resolve_local(value: str | None) -> str | None:
    """An existing local path made absolute; anything else (a hub name) unchanged."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() or value.startswith((".", "/", "~")) else value


def split_sources(spec: str | None) -> list[str]:
    """``"a.jsonl, b.jsonl"`` -> two sources (``data.train``, ``data.eval``, ``export.calibration``): several
    are concatenated, as LLaMA-Factory's dataset lists are."""
    return [part.strip() for part in (spec or "").split(",") if part.strip()]


def resolve_sources(spec: str | None) -> str | None:
    """A list of data sources (:func:`split_sources`) with each local path made absolute."""
    if not spec:
        return spec
    return ",".join(resolve_local(part) for part in split_sources(spec))


def resolve_paths(recipe):
    """The recipe with every local path absolute (against the current directory), so the run's
    record works from any directory."""
    data = dataclasses.replace(
        recipe.data,
        train=resolve_sources(recipe.data.train),
        eval=resolve_sources(recipe.data.eval),
    )
    model = dataclasses.replace(recipe.model, name_or_path=resolve_local(recipe.model.name_or_path))
    export = dataclasses.replace(
        recipe.export,
        calibration=resolve_sources(recipe.export.calibration),
        out=str(Path(recipe.export.out).expanduser().resolve()) if recipe.export.out else None,
    )
    reuse = str(Path(recipe.reuse_from).expanduser().resolve()) if recipe.reuse_from else None
    return dataclasses.replace(
        recipe,
        data=data,
        model=model,
        export=export,
        reuse_from=reuse,
        output_dir=str(Path(recipe.output_dir).expanduser().resolve()),
    )


def read_record(output_dir: Path) -> dict | None:
    import yaml

    path = run_dir.recipe_file(output_dir)
    if not path.is_file():
        return None
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(record, dict):
        return None
    rename_deprecated_keys(record, warn=False)  # a record written before a key was renamed: same settings
    # records written before paths were stored absolute: read them against the current directory
    for group, key, resolve in (
        ("model", "name_or_path", resolve_local),
        ("data", "train", resolve_sources),
        ("data", "eval", resolve_sources),
        ("export", "calibration", resolve_sources),
    ):
        if isinstance(record.get(group), dict) and isinstance(record[group].get(key), str):
            record[group][key] = resolve(record[group][key])
    return record


def write_record(output_dir: Path, recipe_dict: dict) -> None:
    import yaml

    tmp = output_dir / f".{run_dir.RECIPE}.tmp-{os.getpid()}"
    tmp.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    os.replace(tmp, run_dir.recipe_file(output_dir))
