"""LoRA and QLoRA for LTE stages, through PEFT and bitsandbytes.

A stage model is an LTE checkpoint loaded by :func:`lte.model.inject.load_lte` (optionally with 4-bit
base weights); :func:`add_lora` puts LoRA adapters on its linear projections and on the 3-D weights of
MoE models' routed experts (PEFT's ``target_parameters``), and, in stage 1, trains the routers in full
through PEFT's ``modules_to_save`` (a trainable float32 copy; the routers are never quantized, never
adapted; under DeepSpeed bf16 the engine trains them in bf16). The model's own MoE routers are never
adapted either: frozen, or trained in full with ``lte.train_moe_router``.
At the end of a stage the adapter is saved, and
:func:`merge_adapter` applies it to an unquantized copy of the stage's starting checkpoint and
merges it, so the next stage, the evaluation and the export all see a plain LTE model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.errors import UsageError
from ..core.imports import hidden
from ..model.experts import experts_hosts, moe_router_parameters
from ..model.inject import load_lte, lte_layers
from ..model.layers import ROUTER_PREFIX
from ..model.registry import logical_shape
from .config import ALL_EXPERTS, LoraArgs

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


@contextmanager
def _as_built():
    """Around PEFT's adapter injection: PEFT rewrites the targets of some MoE families (Mixtral, Qwen3-MoE,
    OLMoE...) to load adapters trained on transformers 4's per-expert ``nn.Linear``s: module names ending
    in ``gate_proj``/``up_proj``/``down_proj``/``gate`` become the fused experts' tensors at twice the rank,
    and the MoE router is adapted. These adapters are made on transformers 5 models with explicit targets,
    so that rewrite would move a dense FFN's projections into the experts and adapt frozen routers; it is
    turned off (the targets are checked after, :func:`_check_targets`)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the rewrite
        yield
        return
    convert = getattr(conversion, "convert_peft_config_for_transformers", None)
    if convert is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = convert


def expert_parameters(model, lora: LoraArgs) -> list[str]:
    """The 3-D weights LoRA adapts (PEFT ``target_parameters``): with ``all-experts``, the up and down
    tensors of every routed experts module LTE can route (none on a dense model). Named as PEFT matches
    them: without the wrappers' ``.base_layer``."""
    if lora.target_parameters != [ALL_EXPERTS]:
        return list(lora.target_parameters)
    hosts = experts_hosts(model).items()
    return [f"{_unwrapped(path)}.{name}" for path, layout in hosts for name in (layout.up, layout.down)]


def _unwrapped(path: str) -> str:
    return path.replace(".base_layer", "")


def check_lora(model, lora: LoraArgs, train_moe_router: bool = False) -> None:
    """What the recipe's LoRA settings need of ``model`` (an architecture skeleton will do), checked before
    any work: ``lora.target_parameters`` names parameters of it, PEFT's LoRA on a 3-D parameter has no
    dropout, and a trained MoE router is held by modules PEFT can train in full."""
    if not lora.enabled:
        return
    if train_moe_router:
        owned = set(_moe_routers(model))
        loose = [name for name, _ in moe_router_parameters(model) if name.rpartition(".")[0] not in owned]
        if loose:
            raise UsageError(
                f"lte.train_moe_router=true with LoRA: the MoE router parameter {loose[0]} is held by the MoE block "
                f"itself, which PEFT cannot train in full beside its experts; train without LoRA (lora.r=0), or "
                f"keep the router frozen (lte.train_moe_router=false)"
            )
    given = lora.target_parameters
    if ALL_EXPERTS in given and given != [ALL_EXPERTS]:
        raise UsageError(
            f"lora.target_parameters={given}: '{ALL_EXPERTS}' stands alone; give [{ALL_EXPERTS}] or parameter names"
        )
    if given != [ALL_EXPERTS]:
        params = {_unwrapped(name): logical_shape(param) for name, param in model.named_parameters()}
        for key in given:
            if not any(name == key or name.endswith("." + key) for name in params):
                three_d = sorted({".".join(n.split(".")[-2:]) for n, shape in params.items() if len(shape) == 3})
                raise UsageError(
                    f"lora.target_parameters: {key!r} names no parameter of {type(model).__name__}; "
                    + (f"its 3-D weights end in {', '.join(three_d)}" if three_d else "it has no 3-D weights")
                    + f"; give such names, [{ALL_EXPERTS}], or []"
                )
    if lora.dropout and expert_parameters(model, lora):
        raise UsageError(
            f"lora.dropout={lora.dropout}: LoRA on the routed experts' 3-D weights (lora.target_parameters, PEFT's "
            f"target_parameters) has no dropout; set lora.dropout=0, or lora.target_parameters=[] to leave the "
            f"experts frozen"
        )


def _moe_routers(model) -> list[str]:
    """The modules holding the model's own MoE router parameters (``...mlp.gate``). A router parameter held
    by the MoE block itself is left out (excluding the block would exclude its experts): PEFT keeps it frozen."""
    hosts = list(experts_hosts(model))
    owners = {name.rpartition(".")[0] for name, _ in moe_router_parameters(model)}
    return sorted(owner for owner in owners if not any(path.startswith(owner + ".") for path in hosts))


def _linear_targets(model, lora: LoraArgs, excluded: list[str]) -> list[str]:
    """``lora.target_modules`` with ``all-linear`` resolved as PEFT resolves it (every linear layer but the
    output head), less the routers."""
    if lora.target_modules != ["all-linear"]:
        return list(lora.target_modules)
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    names = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
    inside = lambda name, module: name == module or name.startswith(module + ".")  # noqa: E731
    return sorted(n for n in names if ROUTER_PREFIX not in n.split(".") and not any(inside(n, e) for e in excluded))


def _check_targets(model, expected: list[str]) -> None:
    """Every requested 3-D parameter is wrapped exactly once, and nothing else is."""
    from peft.tuners.lora.layer import ParamWrapper

    names = {id(m): _unwrapped(n.removeprefix("base_model.model.")) for n, m in model.named_modules()}
    wrapped = [
        f"{names[id(m.get_base_layer())]}.{m.parameter_name}" for m in model.modules() if isinstance(m, ParamWrapper)
    ]

    def match(name, key):
        return name == key or name.endswith("." + key)

    if (
        len(set(wrapped)) != len(wrapped)
        or any(not any(match(w, e) for e in expected) for w in wrapped)
        or any(not any(match(w, e) for w in wrapped) for e in expected)
    ):
        raise RuntimeError(f"PEFT adapted the 3-D parameters {sorted(wrapped)}, not the ones asked for: {expected}")


def add_lora(
    model, lora: LoraArgs, train_routers: bool, gradient_checkpointing: bool = False, train_moe_router: bool = False
):
    """Wrap an LTE model in a ``PeftModel``: LoRA on the projections and the routed experts' weights, LTE
    routers trained in full (``train_routers``) or frozen, the MoE routers trained in full
    (``train_moe_router``) or frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for layer in lte_layers(model):
        layer.lte_router.float()
    if lora.load_in_4bit:
        # Freezes the base, upcasts the non-quantized weights (norms, routers) to float32; but not the routed
        # experts' 3-D tensors (bitsandbytes leaves them unquantized): most of an MoE model, kept as loaded.
        # Their data is set aside meanwhile, so no fp32 copy of them ever exists (a peak of twice their size).
        experts = [param for path in experts_hosts(model) for param in model.get_submodule(path).parameters()]
        held = [param.data for param in experts]
        for param in experts:
            param.data = param.data.new_empty(0)
        try:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        finally:
            for param, data in zip(experts, held, strict=True):
                param.data = data
    check_lora(model, lora, train_moe_router)
    moe_routers = _moe_routers(model)
    experts = expert_parameters(model, lora)
    saved = ([ROUTER_PREFIX] if train_routers else []) + (moe_routers if train_moe_router else [])
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_linear_targets(model, lora, moe_routers),
        target_parameters=experts or None,
        exclude_modules=[ROUTER_PREFIX, *moe_routers],
        modules_to_save=saved or None,
        task_type="CAUSAL_LM",
    )
    with _bitsandbytes_unless(lora.load_in_4bit), _as_built():
        model = get_peft_model(model, config)
    _check_targets(model, experts)
    for layer in lte_layers(model):
        layer.attach_hooks()  # onto the LoRA layers now at the gate/down paths
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d on %s%s%s: %d of %d parameters trainable (%.2f%%), routers %s%s",
        lora.r,
        lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules,
        f" and the experts' weights of {len(experts) // 2} MoE layers"
        if lora.target_parameters == [ALL_EXPERTS] and experts
        else (f" and {experts}" if experts else ""),
        " over a 4-bit base" if lora.load_in_4bit else "",
        trainable,
        total,
        100 * trainable / total,
        "trained in full" if train_routers else "frozen",
        ("" if not moe_routers else ", MoE routers " + ("trained in full" if train_moe_router else "frozen")),
    )
    return model


def merge_adapter(source: str | Path, adapter: str | Path, **from_pretrained_kwargs):
    """The stage's starting LTE checkpoint (unquantized) with the trained adapter merged in."""
    from peft import PeftModel

    model = load_lte(source, **from_pretrained_kwargs)
    for layer in lte_layers(model):
        layer.lte_router.float()  # as in training: the saved router copy is float32
    layers = len(lte_layers(model))
    with _bitsandbytes_unless(False), _as_built():  # merged into the unquantized checkpoint
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if len(lte_layers(merged)) != layers or any("lora_" in name for name, _ in merged.named_modules()):
        raise RuntimeError(f"merging {adapter} did not give a plain LTE model (PEFT changed how it unloads layers?)")
    for layer in lte_layers(merged):
        layer.attach_hooks()  # back onto the merged projections
    dtype = next(p.dtype for n, p in merged.named_parameters() if ROUTER_PREFIX not in n)
    for layer in lte_layers(merged):
        layer.lte_router.to(dtype)
    return merged
