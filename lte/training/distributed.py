"""What LTE needs from a multi-process run (DDP, FSDP2, DeepSpeed ZeRO-2/3).

The rules (see the README's multi-GPU section):

* expert grouping and router initialisation happen once, in one process, before anything is
  sharded (the pipeline's ``prepare`` step writes them to disk; every stage loads that file);
* a finished stage is gathered into one full state dict (``Accelerator.get_state_dict``:
  FSDP2 full state dict, ZeRO-3 16-bit consolidation) and saved by rank 0;
* every rank must end a stage with the same routers: checked on the gathered tensors;
* under ZeRO-3 the LTE FFN is a leaf module (DeepSpeed fetches its weights as one unit, so a
  data-dependent expert order cannot break its prefetch trace);
* the one-process steps after training (evaluation, export) load models without ZeRO-3's
  partitioned ``from_pretrained``: :func:`no_zero3_init`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from unittest import mock

import torch
from torch import nn

from ..model.inject import lte_layers
from ..model.layers import LTEMLP

logger = logging.getLogger("lte")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_object(value):
    """Rank 0's ``value`` on every process (identity when not distributed)."""
    if is_distributed():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


@contextlib.contextmanager
def no_zero3_init():
    """Load models whole inside this block, even while a ZeRO-3 config is live.

    transformers partitions ``from_pretrained`` across ranks (``deepspeed.zero.Init``) whenever
    an ``HfDeepSpeedConfig`` for stage 3 exists; a step that runs on one process only must not,
    or it waits forever for ranks that are not loading anything.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter for the object itself
    live = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_deepspeed.set_hf_deepspeed_config(live)


@contextlib.contextmanager
def every_rank_loads():
    """Inside this block every rank reads full weights in ``from_pretrained``, also under FSDP's
    ``fsdp_cpu_ram_efficient_loading`` (which otherwise leaves ranks > 0 with meta tensors that
    only ``Accelerator.prepare`` fills in). For models sharded outside the Trainer: the teacher."""
    with mock.patch.dict(os.environ, {"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}):
        yield


def register_zero3_leaves(model: nn.Module) -> None:
    """Mark every LTE FFN as a ZeRO-3 leaf module (no-op unless ZeRO-3 is active)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and lte_layers(model):
        from deepspeed.utils import set_z3_leaf_modules

        leaves = set_z3_leaf_modules(model, [LTEMLP])
        logger.info("ZeRO-3: %d LTE FFNs registered as leaf modules", len(leaves))


def _local_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` this process stores (its shard under FSDP2 or ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    return param.numel()


def full_router_vector(model: nn.Module) -> tuple[torch.Tensor, int]:
    """All router parameters as one float vector, gathered whole from FSDP2 or ZeRO-3 shards,
    and how many of its elements this process stores (a collective: every rank calls it)."""
    params = [p for layer in lte_layers(model) for p in layer.lte_router.parameters()]
    if not params:
        return torch.empty(0), 0
    local = sum(_local_numel(p) for p in params)
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().reshape(-1).clone() for p in params]), local
    from torch.distributed.tensor import DTensor

    full = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().float().reshape(-1) for p in params]
    return torch.cat(full), local


def check_routers_identical(model: nn.Module, stage: str) -> None:
    """Every process must end a stage with the same routers: rank 0 saves the model, so a
    divergence would silently drop what the other ranks learned."""
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    flat, local = full_router_vector(model)
    if world == 1 or flat.numel() == 0:
        return
    if torch.distributed.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    worst = max(float((other - flat).abs().max()) for other in gathered)
    if worst > 0:
        raise RuntimeError(f"{stage}: router weights differ across processes (max difference {worst:.3e})")
    # Under FSDP2 / ZeRO-3 every rank gathers the same shards, so this mostly checks the gather;
    # that the trained routers reach the saved checkpoint is tested separately.
    logger.info(
        "%s: routers identical on all %d processes (%d router parameters, %d stored on this process)",
        stage,
        world,
        flat.numel(),
        local,
    )


def is_sharded(accelerator) -> bool:
    """Whether parameters are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    )


def describe_parallelism(accelerator) -> str:
    """How the Trainer's accelerator runs the model, for the logs: "DDP", "FSDP2", "DeepSpeed ZeRO-3"..."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP" if accelerator.num_processes > 1 else "one process"
