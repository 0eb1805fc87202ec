"""Checks of a model that every command reading one runs before any work: its config, weight files and
tokenizer load (:func:`check_model`), and an explicit attention implementation is one it supports.

``lte train`` (:mod:`lte.pipeline`), ``lte compare`` and ``lte analyze`` all call them, so they live
below those commands.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..core.errors import UsageError


def check_attn_implementation(model_class, choice: str | None) -> None:
    """An explicit ``model.attn_implementation`` must be one the architecture supports (None: transformers
    chooses; a hub kernel name ``org/repo`` is left to transformers)."""
    if choice is None or "/" in choice:
        return
    supported = (
        ["eager"]
        + (["sdpa"] if model_class._supports_sdpa else [])
        + (["flash_attention_2", "flash_attention_3"] if model_class._supports_flash_attn else [])
        + (["flex_attention"] if model_class._supports_flex_attn else [])
    )
    if choice not in supported:
        raise UsageError(
            f"model.attn_implementation={choice!r} is not supported by {model_class.__name__}; choose one of "
            f"{', '.join(supported)}, or leave it unset (null) to let transformers choose"
        )


WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def check_model(source: str, key: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config loads, a local model's weight files exist and their headers parse, and its
    tokenizer loads: a damaged or incomplete model directory fails here, before any work or write.
    Every command that reads a model checks it this way (``key`` names the setting in messages)."""
    local = Path(source).expanduser()
    is_local = source.startswith((".", "/", "~")) or local.exists()
    if is_local and not (local / "config.json").is_file():
        raise UsageError(f"{key}={source}: no model there (expected a directory with config.json)")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load {key}={source!r}: {str(exc).splitlines()[0]}") from None
    if is_local:
        check_weight_files(local, key)
    try:
        AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        raise UsageError(
            f"{key}={source}: its tokenizer does not load ({str(exc).strip().splitlines()[0]}); "
            f"put the model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json) "
            f"next to config.json"
        ) from None
    return config


def check_weight_files(directory: Path, key: str) -> None:
    """Weights exist (single file or every shard of an index) and every safetensors header parses
    and covers its file (a truncated download or copy fails here)."""
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise UsageError(
            f"{key}={directory}: no weights there (none of {', '.join(WEIGHT_FILES)}); "
            f"point it at a complete model directory"
        )
    name = present[0]
    files = [directory / name]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(files[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"{key}: {files[0]} is not a valid weight index ({exc}); restore the model's files"
            ) from None
        files = [directory / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise UsageError(f"{key}: weight shard {file} is missing; restore the model's files")
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt"):
                    pass
            except Exception as exc:  # SafetensorError and friends: the header does not describe this file
                raise UsageError(
                    f"{key}: {file} is damaged ({str(exc).splitlines()[0]}); restore or re-download the model"
                ) from None
        elif file.stat().st_size == 0:
            raise UsageError(f"{key}: {file} is empty; restore or re-download the model")
