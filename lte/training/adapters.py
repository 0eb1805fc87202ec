"""LoRA and QLoRA for LTE stages, through PEFT and bitsandbytes.

A stage model is an LTE checkpoint loaded by :func:`lte.model.inject.load_lte` (optionally with 4-bit
base weights); :func:`add_lora` puts LoRA adapters on its linear projections and, in stage 1,
trains the routers in full through PEFT's ``modules_to_save`` (a trainable float32 copy; the
routers are never quantized, never adapted; under DeepSpeed bf16 the engine trains them in bf16).
At the end of a stage the adapter is saved, and
:func:`merge_adapter` applies it to an unquantized copy of the stage's starting checkpoint and
merges it, so the next stage, the evaluation and the export all see a plain LTE model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.imports import hidden
from ..model.inject import load_lte, lte_layers
from ..model.layers import ROUTER_PREFIX
from .config import LoraArgs

logger = logging.getLogger("lte")


def quantization_config(lora: LoraArgs, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of a QLoRA recipe, or None."""
    if not lora.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lora.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=lora.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


@contextmanager
def _bitsandbytes_unless(quantized: bool):
    """Around PEFT's LoRA dispatch, which imports bitsandbytes whenever it is installed: only a
    4-bit base needs it (:func:`lte.core.imports.hidden`). PEFT caches whether it found it; the
    cache is cleared after, so a later quantized model in this process finds it."""
    if quantized:
        yield
        return
    from peft import import_utils

    try:
        with hidden("bitsandbytes"):
            yield
    finally:
        import_utils.is_bnb_available.cache_clear()
        import_utils.is_bnb_4bit_available.cache_clear()


def add_lora(model, lora: LoraArgs, train_routers: bool, gradient_checkpointing: bool = False):
    """Wrap an LTE model in a ``PeftModel``: LoRA on the projections, routers trained in full
    (``train_routers``) or frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for layer in lte_layers(model):
        layer.lte_router.float()
    if lora.load_in_4bit:
        # Freezes the base, upcasts the non-quantized weights (norms, routers) to float32.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets = lora.target_modules[0] if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        exclude_modules=[ROUTER_PREFIX],
        modules_to_save=[ROUTER_PREFIX] if train_routers else None,
        task_type="CAUSAL_LM",
    )
    with _bitsandbytes_unless(lora.load_in_4bit):
        model = get_peft_model(model, config)
    for layer in lte_layers(model):
        layer.attach_hooks()  # onto the LoRA layers now at the gate/down paths
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d on %s%s: %d of %d parameters trainable (%.2f%%), routers %s",
        lora.r,
        targets,
        " over a 4-bit base" if lora.load_in_4bit else "",
        trainable,
        total,
        100 * trainable / total,
        "trained in full" if train_routers else "frozen",
    )
    return model


def merge_adapter(source: str | Path, adapter: str | Path, **from_pretrained_kwargs):
    """The stage's starting LTE checkpoint (unquantized) with the trained adapter merged in."""
    from peft import PeftModel

    model = load_lte(source, **from_pretrained_kwargs)
    for layer in lte_layers(model):
        layer.lte_router.float()  # as in training: the saved router copy is float32
    layers = len(lte_layers(model))
    with _bitsandbytes_unless(False):  # merged into the unquantized checkpoint
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if len(lte_layers(merged)) != layers or any("lora_" in name for name, _ in merged.named_modules()):
        raise RuntimeError(f"merging {adapter} did not give a plain LTE model (PEFT changed how it unloads layers?)")
    for layer in lte_layers(merged):
        layer.attach_hooks()  # back onto the merged projections
    dtype = next(p.dtype for n, p in merged.named_parameters() if ROUTER_PREFIX not in n)
    for layer in lte_layers(merged):
        layer.lte_router.to(dtype)
    return merged
