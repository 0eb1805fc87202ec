"""The LTE FFN: the original FFN module kept as ``base_layer``, plus a sigmoid router.

The router reads the FFN input (the input of its first projection) and scores each expert
``G = sigmoid(router(x))``. The expert mask is applied to the input of the down projection,
where every intermediate neuron is visible, and the model's own forward does the rest.
Each layer's ``routing`` (set per stage by :func:`lte.model.inject.set_lte_routing`) is one of:

* ``dense``: router unused, output identical to the original model;
* ``soft`` (stage 1): ``sum_i G_i(x) E_i(x)``, every neuron of expert ``i`` scaled by ``G_i``;
* ``hard`` (stage 2, inference): ``sum_{i: G_i > threshold} E_i(x)``, unscaled. The threshold
  is ``lte.threshold`` during training; ``lte export`` tunes one per layer.

Both hooks are registered on the wrapped projections and removed by :meth:`LTEMLP.unwrap`.
Router scores are handed to the loss through :func:`collect_router_scores`, a ContextVar
scope that is open only during the top-level forward, so the forward that activation
checkpointing replays during backward records nothing twice.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import warn_deprecated
from .registry import FFNSpec, feature_axes, weight_shape

ROUTINGS = ("dense", "soft", "hard")  # how an LTE layer runs its FFN
ROUTER_PREFIX = "lte_router"


@dataclass
class RouterRecord:
    """One layer's router scores for one forward: ``scores`` [tokens, experts] (graph attached)."""

    layer: int
    scores: torch.Tensor
    trained_threshold: float  # lte.threshold, which the separability loss pulls scores away from
    threshold: float  # the live cut-off (export retunes it per layer)
    # Routed experts (lte.model.experts): the token each row belongs to (a row per (token, selected
    # expert)); None: one row per token.
    tokens: torch.Tensor | None = None


def threshold_skipping(values: torch.Tensor, k: int) -> float:
    """A cut-off below which the ``k`` (>= 1) smallest of ``values`` fall (with any tied with the k-th):
    midway between the k-th smallest and the next larger value, as ``values``' dtype holds it (a bf16 router
    compares its bf16 scores with the threshold rounded to bf16). The k-th value itself would sit on the
    threshold of ``> threshold``, and the tokens it was chosen on (calibration, validation) would flip with the
    last bit of whichever kernel computes their scores. Where no value of the dtype lies between the two
    neighbours, the k-th value is the cut-off."""
    flat = values.reshape(-1)
    kth = flat.kthvalue(k).values
    above = flat[flat > kth]
    if above.numel() == 0:
        return float(kth)
    nxt = above.min()
    mid = ((kth.double() + nxt.double()) / 2).to(flat.dtype)
    return float(mid) if kth < mid < nxt else float(kth)


def __getattr__(name: str):
    if name == "MODES":  # the old name, for one release
        warn_deprecated("lte.model.layers.MODES", "ROUTINGS")
        return ROUTINGS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_collector: ContextVar[list[RouterRecord] | None] = ContextVar("lte_router_collector", default=None)


@contextlib.contextmanager
def collect_router_scores():
    """Record every LTE layer's router scores during the forwards run inside this block."""
    records: list[RouterRecord] = []
    token = _collector.set(records)
    try:
        yield records
    finally:
        _collector.reset(token)


class LTEMLP(nn.Module):
    """Wraps one FFN host module; see the module docstring for the routings."""

    def __init__(
        self,
        base_layer: nn.Module,
        spec: FFNSpec,
        expert_size: int,
        layer_index: int,
        threshold: float = 0.5,
        router_bias: bool = False,
        detach_router_input: bool = False,
        tau: float | None = None,
    ):
        super().__init__()
        first = base_layer.get_submodule(spec.first[0])
        down = base_layer.get_submodule(spec.down)
        d_model = weight_shape(first)[feature_axes(first)[1]]
        width = weight_shape(down)[feature_axes(down)[1]]  # a multiple of expert_size: see check_expert_size
        self.base_layer = base_layer
        self.spec = spec
        self.expert_size = expert_size
        self.num_experts = width // expert_size
        self.layer_index = layer_index
        if tau is not None:  # the old keyword, for one release
            warn_deprecated("LTEMLP(tau=...)", "LTEMLP(threshold=...)")
            threshold = tau
        self.trained_threshold = threshold
        self.threshold = threshold
        self.routing = "dense"
        self.detach_router_input = detach_router_input
        weight = first.weight
        # Routers are created after loading, so never quantized; next to packed 4-bit storage
        # (QLoRA with uint8 storage) they take float32. LoRA training keeps them in float32.
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lte_router = nn.Linear(d_model, self.num_experts, bias=router_bias, device=weight.device, dtype=dtype)
        self._scores: torch.Tensor | None = None
        self._hooks: list = []
        self.attach_hooks()

    def attach_hooks(self) -> None:
        """Hook the modules now at the first/down paths. Call it again after replacing a
        projection: PEFT puts a LoRA layer there that holds the original as its own
        ``base_layer``, and the mask must apply to the LoRA layer's input, or skipped neurons would
        still reach the output through the adapter (:func:`lte.training.adapters.add_lora` does this)."""
        for hook in self._hooks:
            hook.remove()
        first = self.base_layer.get_submodule(self.spec.first[0])
        down = self.base_layer.get_submodule(self.spec.down)
        self._hooks = [first.register_forward_pre_hook(self._route), down.register_forward_pre_hook(self._mask)]

    @torch.no_grad()
    def init_router_from_experts(self, scale: float = 1.0) -> None:
        """Router row ``e`` := mean weight row of expert ``e``'s neurons (times ``scale``).

        The initial logit is then the expert's mean gate pre-activation, so the starting
        routing already tracks which experts a token activates (MoEfication initialises its
        routers from cluster centroids the same way). Without it, scores start near 0.5 at
        random and the first steps of stage 1 mostly undo an arbitrary split.
        """
        from .grouping import neuron_rows

        rows = neuron_rows(self.base_layer, self.spec).float()
        centroids = rows.reshape(self.num_experts, self.expert_size, -1).mean(dim=1)
        self.lte_router.weight.copy_(scale * centroids)
        if self.lte_router.bias is not None:
            projection = self.base_layer.get_submodule(self.spec.cluster_on)
            bias = getattr(projection, "bias", None)
            if bias is None:
                self.lte_router.bias.zero_()
            else:
                width = self.num_experts * self.expert_size
                self.lte_router.bias.copy_(scale * bias[:width].float().reshape(self.num_experts, -1).mean(dim=1))

    def __getattr__(self, name: str):
        """The wrapped host's submodules, parameters and buffers too: model code may read them (RWKV
        rescales ``feed_forward.value.weight`` from its model's forward). Only those: other names
        (accelerate's ``_hf_hook``, ``_old_forward``) must not answer for the wrapped module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            base = super().__getattr__("base_layer")
            if any(name in vars(base).get(store, {}) for store in ("_modules", "_parameters", "_buffers")):
                return getattr(base, name)
            raise

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores G(x) in (0, 1), one per expert."""
        return torch.sigmoid(self.lte_router(x.to(self.lte_router.weight.dtype)))

    def _route(self, module, args):
        if self.routing == "dense":
            return None
        x = args[0].detach() if self.detach_router_input else args[0]
        scores = self.scores(x)
        self._scores = scores
        records = _collector.get()
        if records is not None:
            records.append(
                RouterRecord(
                    self.layer_index, scores.reshape(-1, self.num_experts), self.trained_threshold, self.threshold
                )
            )
        return None

    def _mask(self, module, args):
        if self.routing == "dense":
            return None
        scores, self._scores = self._scores, None
        h = args[0]
        gate = scores if self.routing == "soft" else (scores > self.threshold).to(scores.dtype)
        shape = h.shape
        h = (h.reshape(*shape[:-1], self.num_experts, self.expert_size) * gate.to(h.dtype).unsqueeze(-1)).reshape(shape)
        return (h, *args[1:])

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False, adapter_names=None):
        """PEFT's ``merge_and_unload`` treats any module with a ``base_layer`` as one of its own
        adapter layers, unless the module unloads itself through this method. An LTE layer is not
        an adapter: it stays, and PEFT goes on to merge the LoRA layers inside it."""
        return self

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the original module (weights stay permuted)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return self.base_layer

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, expert_size={self.expert_size}, "
            f"trained_threshold={self.trained_threshold}, threshold={self.threshold}, routing={self.routing}"
        )

    @property
    def mode(self) -> str:
        """Deprecated name of :attr:`routing`."""
        warn_deprecated("LTEMLP.mode", "LTEMLP.routing")
        return self.routing

    @mode.setter
    def mode(self, value: str) -> None:
        warn_deprecated("LTEMLP.mode", "LTEMLP.routing")
        self.routing = value

    @property
    def tau(self) -> float:
        """Deprecated name of :attr:`trained_threshold`."""
        warn_deprecated("LTEMLP.tau", "LTEMLP.trained_threshold")
        return self.trained_threshold


def lte_layers(model: nn.Module) -> list[LTEMLP]:
    """The model's LTE layers in depth order. Resolved on each call, never cached, so it stays
    right after PEFT, FSDP or DeepSpeed rewrap the model."""
    return [m for m in model.modules() if isinstance(m, LTEMLP)]
