"""The layout of a run directory (the ``output_dir`` of ``lte train``): the only module that knows it.

Every other module asks here for a path instead of joining names itself, so the layout is written once::

    OUTPUT_DIR/
      recipe.yaml                the run's record (lte.core.record): what every stage was made with
      report.json                dense vs. LTE figures; per_layer_sparsity.png beside it
      stage0/ prepare/ stage1/ stage2/
        checkpoint-N/            the stage's Trainer checkpoints (a rerun resumes from the last intact one)
        model/                   the finished model (an LTE checkpoint: lte_config.json + lte_routers.safetensors)
        adapter/                 the LoRA adapter of a LoRA stage
        diverged.json            the stage diverged; a rerun with changed settings restarts it
      export/                    the default ``export.out``: the sparse checkpoint, lte_export.json
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

RECIPE = "recipe.yaml"
REPORT = "report.json"
PLOT = "per_layer_sparsity.png"  # the run's and the export's per-layer sparsity plot
MODEL = "model"
ADAPTER = "adapter"
CHECKPOINT_PREFIX = "checkpoint-"
DIVERGED = "diverged.json"
EXPORT = "export"
EXPORT_REPORT = "lte_export.json"  # in an export directory
LTE_CONFIG = "lte_config.json"  # in an LTE checkpoint (a stage's model)
LTE_ROUTERS = "lte_routers.safetensors"

PathLike = str | os.PathLike


def recipe_file(run: PathLike) -> Path:
    return Path(run) / RECIPE


def report_file(run: PathLike) -> Path:
    return Path(run) / REPORT


def plot_file(run: PathLike) -> Path:
    return Path(run) / PLOT


def stage_dir(run: PathLike, stage: str) -> Path:
    return Path(run) / stage


def stage_model(run: PathLike, stage: str) -> Path:
    """Where ``stage`` writes its finished model."""
    return stage_dir(run, stage) / MODEL


def adapter_dir(run: PathLike, stage: str) -> Path:
    return stage_dir(run, stage) / ADAPTER


def diverged_file(run: PathLike, stage: str) -> Path:
    return stage_dir(run, stage) / DIVERGED


def is_finished(run: PathLike, stage: str) -> bool:
    """``stage`` holds a finished model (written whole: it is renamed into place)."""
    return (stage_model(run, stage) / "config.json").is_file()


def has_checkpoints(run: PathLike, stage: str) -> bool:
    directory = stage_dir(run, stage)
    return directory.is_dir() and any(p.name.startswith(CHECKPOINT_PREFIX) for p in directory.iterdir())


def default_export(run: PathLike) -> Path:
    return Path(run) / EXPORT


def export_report_file(export_dir: PathLike) -> Path:
    return Path(export_dir) / EXPORT_REPORT


def lte_config_file(model_dir: PathLike) -> Path:
    return Path(model_dir) / LTE_CONFIG


def is_lte_checkpoint(model_dir: PathLike) -> bool:
    return lte_config_file(model_dir).is_file() and (Path(model_dir) / LTE_ROUTERS).is_file()


def stage2_model(run: PathLike) -> Path:
    """The run's stage-2 model, or one message saying what is missing and how to make it."""
    path = stage_model(run, "stage2")
    if not Path(run).is_dir():
        raise UsageError(f"{run}: no such run directory; give the output_dir of an `lte train` run")
    if not is_lte_checkpoint(path):
        raise UsageError(
            f"{run} has no stage-2 model ({path} is missing or incomplete); "
            f"finish training first: rerun `python train.py recipe=... output_dir={run}`"
        )
    return path
