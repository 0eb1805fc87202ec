"""Choose per-layer router thresholds that hit a requested FFN sparsity.

Training fixes one threshold (``lte.threshold``), so the sparsity a model reaches is whatever the data
gives. Here the user names it instead. Two steps:

1. **Allocation**: how sparse each layer should be, with the layers' mean equal to the target.
   ``uniform`` gives every layer the target. ``tuned`` (the default) spends the budget where
   the loss cares least: it measures each layer's *sensitivity curve* (the calibration loss
   change when only that layer is moved to each of a grid of sparsities, the others staying
   at their trained thresholds), then picks the
   per-layer sparsities that minimise the summed increases under the mean constraint, exactly,
   by dynamic programming on a 0.5% grid. Layers interact, so the result is checked on the
   joint model against the uniform allocation, and the better one on calibration is kept.
2. **Calibration**: layer by layer in depth order, the threshold is the score quantile that
   skips the layer's share of (token, expert) pairs, measured with the earlier layers already
   at their final thresholds (a layer's input depends on them). The calibration sparsity
   therefore equals the target up to ties.

Thresholds live on the LTE layers (``LTEMLP.threshold``); the model must have ``hard`` routing.
A layer at 0% sparsity gets :data:`KEEP_ALL`, a threshold below every score, so it runs every expert.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import warn_deprecated
from ..model.inject import lte_layers, set_lte_routing
from ..model.layers import collect_router_scores, threshold_skipping
from ..training.evaluate import EvalResult, evaluate_batches
from ..training.export_args import ALLOCATIONS  # noqa: F401  (re-exported: compare names it from here)

logger = logging.getLogger("lte")

KEEP_ALL = -1.0  # a threshold below every sigmoid score: the layer runs every expert (0% sparsity)
SENSITIVITY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Thresholds(EvalResult):
    """One allocation calibrated on the calibration batches, with its loss and sparsity there."""

    allocation: str = ""
    targets: list[float] = field(default_factory=list)  # per-layer sparsity the thresholds were calibrated to
    thresholds: list[float] = field(default_factory=list)


def __getattr__(name: str):
    if name == "DENSE":  # the old name, for one release
        warn_deprecated("lte.export.thresholds.DENSE", "KEEP_ALL (or set_lte_routing(model, 'dense') to run dense)")
        return KEEP_ALL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer of interest has been routed."""


def set_thresholds(model, thresholds) -> None:
    for layer, value in zip(lte_layers(model), thresholds, strict=True):
        layer.threshold = float(value)


def dense_nll(model, batches) -> float:
    """Calibration loss with dense routing (every expert runs); the model's routing is left as it was."""
    current = [layer.routing for layer in lte_layers(model)]
    set_lte_routing(model, "dense")
    nll = evaluate_batches(model, batches).nll
    for layer, routing in zip(lte_layers(model), current, strict=True):
        layer.routing = routing
    return nll


@torch.no_grad()
def layer_scores(model, batches, layer: int | None = None) -> list[torch.Tensor]:
    """Router scores of real (non-padding) tokens, per layer: [tokens, experts] on CPU, in the router's dtype
    (the one its thresholds are compared in).

    With ``layer`` set, only that layer's scores, and each forward stops right after it.
    """
    device = next(model.parameters()).device
    layers = lte_layers(model)
    wanted = range(len(layers)) if layer is None else [layer]
    chunks: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    hook = None
    if layer is not None:

        def stop(module, args, output):
            raise _Stop

        hook = layers[layer].register_forward_hook(stop)  # after the layer has routed (and recorded)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            mask = batch.get("attention_mask")
            keep = slice(None) if mask is None else mask.reshape(-1).bool().cpu()
            with collect_router_scores() as records, contextlib.suppress(_Stop):
                model(**batch)
            for record in records:
                if record.layer in chunks:
                    # routed experts: a row per (token, selected expert), kept with its token
                    rows = keep if record.tokens is None or mask is None else keep[record.tokens.cpu()]
                    chunks[record.layer].append(record.scores.detach().cpu()[rows])  # the router's dtype
    finally:
        if hook is not None:
            hook.remove()
    return [torch.cat(chunks[i]) for i in wanted]


def quantile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """The threshold that skips a ``sparsity`` share of the (token, expert) scores."""
    flat = scores.reshape(-1)
    k = round(sparsity * flat.numel())
    if k <= 0:
        return KEEP_ALL
    return threshold_skipping(flat, k)


def calibrate(model, batches, targets: list[float], progress: bool = True) -> list[float]:
    """Per-layer thresholds realising ``targets`` on ``batches``, set on the model, in depth order."""
    n = len(lte_layers(model))
    thresholds = [KEEP_ALL] * n
    set_thresholds(model, thresholds)
    for i in tqdm(range(n), desc="Calibrating thresholds", leave=False, disable=not progress):
        if targets[i] > 0:
            thresholds[i] = quantile_threshold(layer_scores(model, batches, i)[0], targets[i])
            set_thresholds(model, thresholds)
    return thresholds


@dataclass
class Sensitivity:
    """Per-layer loss-change curves around the trained operating point."""

    grid: tuple[float, ...]
    costs: np.ndarray  # [layers, len(grid)]: calibration loss change with one layer at that sparsity
    trained: list[float]  # each layer's sparsity at its trained threshold (loss change 0 by definition)

    def curve(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(sparsities, loss changes) of one layer, including its trained point."""
        points = dict(zip(self.grid, self.costs[layer], strict=True))
        points[round(self.trained[layer], 4)] = 0.0
        xs = np.array(sorted(points))
        return xs, np.array([points[x] for x in xs])


def sensitivity(model, batches, grid=SENSITIVITY_GRID, progress: bool = True) -> Sensitivity:
    """Measure how the calibration loss changes when one layer is moved to each grid sparsity
    while the others keep the model's current (trained) thresholds.

    Measured around the trained operating point, not around the dense model: stage 2 adapts
    the model to its own routing, so running every expert is itself a change it pays for.
    """
    base_thresholds = [layer.threshold for layer in lte_layers(model)]
    base = evaluate_batches(model, batches)
    scores = layer_scores(model, batches)
    costs = np.zeros((len(base_thresholds), len(grid)))
    bar = tqdm(total=costs.size, desc="Measuring layer sensitivity", leave=False, disable=not progress)
    for i in range(len(base_thresholds)):
        for k, s in enumerate(grid):
            thresholds = list(base_thresholds)
            thresholds[i] = quantile_threshold(scores[i], s)
            set_thresholds(model, thresholds)
            costs[i, k] = evaluate_batches(model, batches).nll - base.nll
            bar.update()
    bar.close()
    set_thresholds(model, base_thresholds)
    return Sensitivity(tuple(grid), costs, base.per_layer_sparsity)


def allocate(sens: Sensitivity, target: float) -> list[float]:
    """Per-layer sparsities with mean ``target`` minimising the summed loss changes.

    Each layer's curve (its grid points and its trained point) is interpolated linearly to a
    0.5% grid up to the largest measured sparsity (nothing is extrapolated); an exact DP over
    the total sparsity budget then picks one level per layer.
    """
    n = sens.costs.shape[0]
    step = 0.005
    max_layer_sparsity = max(sens.grid)
    levels = np.arange(round(float(max_layer_sparsity) / step) + 1)  # float(): round() of a NumPy 1 scalar is no int
    curves = np.stack([np.interp(levels * step, *sens.curve(layer)) for layer in range(n)])
    budget = round(float(target) * n / step)
    if budget > levels[-1] * n:
        return [target] * n  # beyond the measured curves: only the uniform allocation is defined
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, budget + 1), dtype=np.int64)
    for layer in range(n):
        nxt = np.full(budget + 1, np.inf)
        for u in levels:
            if u > budget:
                break
            candidate = best[: budget + 1 - u] + curves[layer, u]
            better = candidate < nxt[u:]
            nxt[u:][better] = candidate[better]
            choice[layer, u:][better] = u
        best = nxt
    units, remaining = [], budget
    for layer in reversed(range(n)):
        u = int(choice[layer, remaining])
        units.append(u)
        remaining -= u
    return [round(u * step, 4) for u in reversed(units)]


def evaluate_allocation(model, batches, allocation: str, targets: list[float], progress: bool = True) -> Thresholds:
    thresholds = calibrate(model, batches, targets, progress)
    result = evaluate_batches(model, batches)
    return Thresholds(result.nll, result.tokens, result.per_layer_sparsity, allocation, targets, thresholds)


def choose_thresholds(
    model, batches, target: float, allocation: str = "tuned", sens: Sensitivity | None = None, progress: bool = True
) -> tuple[Thresholds, Thresholds | None]:
    """Thresholds for ``target`` sparsity; returns (chosen, the uniform allocation's result).

    ``tuned`` is kept only when its joint calibration loss is no worse than uniform's.
    ``sens`` (from :func:`sensitivity`) can be passed in to reuse one measurement.
    """
    n = len(lte_layers(model))
    if allocation == "tuned" and sens is None:
        sens = sensitivity(model, batches, progress=progress)  # around the current (trained) thresholds
    uniform = evaluate_allocation(model, batches, "uniform", [target] * n, progress)
    if allocation == "uniform":
        return uniform, uniform
    tuned = evaluate_allocation(model, batches, "tuned", allocate(sens, target), progress)
    chosen = tuned if tuned.nll <= uniform.nll else uniform
    if chosen is uniform:
        logger.info(
            "tuned allocation (calibration ppl %.4f) is not better than uniform (%.4f): keeping uniform",
            tuned.ppl,
            uniform.ppl,
        )
    set_thresholds(model, chosen.thresholds)
    return chosen, uniform


def max_sparsity_within(
    model, batches, max_ppl_increase: float, allocation: str = "tuned", resolution: float = 0.01, progress: bool = True
) -> tuple[Thresholds, float]:
    """The highest sparsity whose calibration perplexity stays within ``max_ppl_increase``
    (a fraction, 0.05 = 5%) of the dense-routing model's; returns (thresholds, dense ppl)."""
    n = len(lte_layers(model))
    sens = sensitivity(model, batches, progress=progress) if allocation == "tuned" else None
    dense = dense_nll(model, batches)
    limit = dense + math.log1p(max_ppl_increase)
    best = Thresholds(dense, 0, [0.0] * n, "dense", [0.0] * n, [KEEP_ALL] * n)
    lo, hi = 0.0, 0.99
    steps = math.ceil(math.log2((hi - lo) / resolution))
    for _ in tqdm(range(steps), desc="Searching the sparsity", leave=False, disable=not progress):
        mid = round((lo + hi) / 2, 4)
        result, _ = choose_thresholds(model, batches, mid, allocation, sens, progress=False)
        if result.nll <= limit:
            lo, best = mid, result
        else:
            hi = mid
    set_thresholds(model, best.thresholds)
    return best, math.exp(dense)
