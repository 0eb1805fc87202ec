"""Put LTE into a Hugging Face model, and take it out again (PEFT's tuner shape).

``inject_lte`` finds every FFN (:mod:`lte.model.detect`, or the layout saved with a run), wraps
its host module with :class:`LTEMLP`, and (unless loading a trained checkpoint) first clusters
and permutes its neurons. The resolved layout is kept in :class:`LTEModelConfig` and saved in
``lte_config.json``, so every later load uses it instead of detecting again (also on a
meta-device or sharded model, where detection cannot trace). The model stays a ``PreTrainedModel``, so
``Trainer`` saves it as usual; router parameters all carry the ``lte_router`` prefix, so saving LTE's own state is a
name filter. ``save_lte``/``load_lte`` write a normal Hugging Face checkpoint of the
(permuted) base model plus ``lte_routers.safetensors`` and ``lte_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import UsageError, renamed_kwargs, warn_deprecated
from ..core.run_dir import LTE_CONFIG as LTE_CONFIG_NAME, LTE_ROUTERS as ROUTERS_NAME, is_lte_checkpoint
from .detect import describe, detect_layout, ffn_widths
from .experts import LTEExperts, experts_layout, group_experts, restore_experts_implementation, use_lte_experts
from .grouping import moefy
from .layers import LTEMLP, ROUTER_PREFIX, ROUTINGS, lte_layers
from .registry import FFNSpec, layout_from_list, layout_to_list
from .router_init import ROUTER_INITS, init_routers

logger = logging.getLogger("lte")


@dataclass
class LTELayerSettings:
    """The settings that shape the LTE layers, defaults included, written once: the recipe's
    ``lte.*`` group (:class:`lte.training.arguments.LTEArguments`) inherits them, and :class:`LTEModelConfig`
    saves them with the layout."""

    expert_size: int = field(default=32, metadata={"help": "FFN neurons per expert (must divide the FFN width)."})
    threshold: float = field(
        default=0.5,
        metadata={"help": "Hard-routing threshold in (0, 1) (the paper's tau): experts with G > threshold run."},
    )
    router_bias: bool = field(default=False, metadata={"help": "Give routers a bias (the paper's Eq. 1 has none)."})
    router_init: str = field(
        default="calibrated",
        metadata={
            "help": "How routers start (lte.model.router_init.ROUTER_INITS): "
            + "; ".join(f"'{k}': {v}" for k, v in ROUTER_INITS.items())
            + "."
        },
    )
    router_init_scale: float = field(
        default=1.0, metadata={"help": "Scale of the centroid router init (a logit temperature)."}
    )
    detach_router_input: bool = field(
        default=False,
        metadata={
            "help": "Routers read a detached FFN input, so the "
            "regularisers train only the routers and the backbone sees only the task loss."
        },
    )


@renamed_kwargs(tau="threshold")  # lte_config.json files written before the rename still load
@dataclass
class LTEModelConfig(LTELayerSettings):
    """What is needed to rebuild the LTE structure around a saved base model (``lte_config.json``)."""

    # The FFN layout, one entry per host in depth order ({"path", "first", "down", "cluster_on",
    # "fused_chunks"}); empty until resolved by detection (or a recipe's model.ffn_layout).
    ffn_hosts: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, settings: LTELayerSettings, **extra) -> LTEModelConfig:
        """The saved part of ``settings`` (e.g. a recipe's :class:`~lte.training.arguments.LTEArguments`)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(LTELayerSettings)}, **extra)


def resolve_layout(model: nn.Module, cfg: LTEModelConfig, recipe_layout: dict | None = None) -> dict[str, FFNSpec]:
    """The saved layout (``cfg.ffn_hosts``), or detect it on ``model`` once and store it in ``cfg``."""
    if not cfg.ffn_hosts:
        layout = detect_layout(model, recipe_layout, group=max(1, cfg.expert_size))
        cfg.ffn_hosts = layout_to_list(layout)
        logger.info("FFN layout of %s: %s", type(model).__name__, describe(layout))
    return layout_from_list(cfg.ffn_hosts)


def inject_lte(
    model: nn.Module,
    cfg: LTEModelConfig,
    *,
    moefy_experts: bool = True,
    kmeans_iters: int = 10,
    seed: int = 0,
    progress: bool = True,
    recipe_layout: dict | None = None,
) -> nn.Module:
    """Wrap every FFN of ``model`` in :class:`LTEMLP`, in place.

    With ``moefy_experts`` the neurons are first grouped into experts (balanced k-means) and
    permuted; pass False when the weights are already permuted (loading a trained run).
    Routers are initialised from ``seed`` so every process builds identical routers.
    ``recipe_layout``: the recipe's ``model.ffn_layout``, for what detection cannot settle.
    """
    check_expert_size(model, cfg.expert_size, recipe_layout, cfg.ffn_hosts)
    layout = resolve_layout(model, cfg, recipe_layout)
    hosts = list(layout.items())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for index, (name, spec) in enumerate(
            tqdm(hosts, desc="MoEfying FFNs" if moefy_experts else "Wrapping FFNs", disable=not progress)
        ):
            host = model.get_submodule(name)
            routed = experts_layout(host)  # fused routed experts: grouped and routed per expert
            if moefy_experts and routed is not None:
                group_experts(host, routed, cfg.expert_size, iters=kmeans_iters, seed=seed + index)
            elif moefy_experts:
                moefy(host, spec, cfg.expert_size, iters=kmeans_iters, seed=seed + index)
            wrapper = (LTEMLP if routed is None else LTEExperts)(
                host,
                spec,
                cfg.expert_size,
                index,
                threshold=cfg.threshold,
                router_bias=cfg.router_bias,
                detach_router_input=cfg.detach_router_input,
            )
            model.set_submodule(name, wrapper)
    finally:
        torch.random.set_rng_state(generator_state)
    if any(isinstance(layer, LTEExperts) for layer in lte_layers(model)):
        use_lte_experts(model)
    model.lte_config = cfg
    if moefy_experts:  # fresh experts: the routers start as cfg.router_init says (those that need no data here)
        init_routers(model, cfg)
    return model


def check_expert_size(
    model: nn.Module, expert_size: int, recipe_layout: dict | None = None, saved: list[dict] | None = None
) -> None:
    """Every FFN width must be a multiple of ``expert_size`` (works on a meta-device model: the
    widths come from the saved layout or the module tree, no forward)."""
    for width in sorted(set(ffn_widths(model, recipe_layout, saved).values())):
        if expert_size <= 0 or width % expert_size:
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            shown = ", ".join(map(str, divisors if len(divisors) <= 16 else [*divisors[:8], "...", *divisors[-4:]]))
            raise UsageError(
                f"lte.expert_size={expert_size} does not divide the FFN width {width}; choose one of {shown}"
            )


def set_lte_routing(model: nn.Module, routing: str) -> None:
    """How every LTE layer runs its FFN: ``dense``, ``soft`` or ``hard`` (see :mod:`lte.model.layers`)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    for layer in lte_layers(model):
        layer.routing = routing


def set_lte_mode(model: nn.Module, mode: str) -> None:
    """Deprecated name of :func:`set_lte_routing`, kept for one release."""
    warn_deprecated("set_lte_mode", "set_lte_routing")
    set_lte_routing(model, mode)


def unload_lte(model: nn.Module) -> nn.Module:
    """Replace every :class:`LTEMLP` by its original module (weights stay permuted)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LTEMLP):
            model.set_submodule(name, module.unwrap())
    restore_experts_implementation(model)
    if hasattr(model, "lte_config"):
        del model.lte_config
    return model


def _router_prefixes(model: nn.Module) -> dict[str, int]:
    """State-dict prefix of each layer's router -> its layer index."""
    return {
        f"{name}.{ROUTER_PREFIX}.": module.layer_index
        for name, module in model.named_modules()
        if isinstance(module, LTEMLP)
    }


def router_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Router weights by layer: ``{"layers.{i}.weight": ..., ...}`` (a prefix filter, PEFT-style).

    ``state``: a full state dict of ``model`` gathered elsewhere (FSDP2, ZeRO-3); default: the model's own.
    """
    state = model.state_dict() if state is None else state
    out = {}
    for prefix, index in _router_prefixes(model).items():
        for key, value in state.items():
            if key.startswith(prefix):
                out[f"layers.{index}.{key[len(prefix) :]}"] = value.detach().cpu().contiguous()
    return out


def base_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A wrapped model's state dict with LTE's wrapper names removed: loadable by the base class."""
    out = {}
    for key, value in state.items():
        if f".{ROUTER_PREFIX}." in key or key.startswith(f"{ROUTER_PREFIX}."):
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_lte(model, out_dir: str | os.PathLike, tokenizer=None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``out_dir`` as a standard checkpoint of the permuted base model plus the routers.

    ``state``: the model's full state dict when it was gathered from shards (FSDP2, ZeRO-3).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    model.save_pretrained(out_dir, state_dict=base_state_dict(state))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file(router_state_dict(model, state), str(out_dir / ROUTERS_NAME))
    (out_dir / LTE_CONFIG_NAME).write_text(json.dumps(asdict(model.lte_config), indent=2) + "\n")


def load_lte(path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a checkpoint written by :func:`save_lte`; returns the model with ``hard`` routing."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not is_lte_checkpoint(path):
        raise UsageError(
            f"{path} is not an LTE checkpoint (no {LTE_CONFIG_NAME} / {ROUTERS_NAME}); "
            f"point to a stage directory written by `lte train`, e.g. RUN_DIR/stage2"
        )
    cfg = LTEModelConfig(**json.loads((path / LTE_CONFIG_NAME).read_text()))
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    inject_lte(model, cfg, moefy_experts=False, progress=False)
    routers = load_file(str(path / ROUTERS_NAME))
    for layer in lte_layers(model):
        prefix = f"layers.{layer.layer_index}."
        layer.lte_router.load_state_dict({k[len(prefix) :]: v for k, v in routers.items() if k.startswith(prefix)})
    set_lte_routing(model, "hard")
    return model
