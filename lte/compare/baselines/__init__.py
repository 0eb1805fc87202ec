"""The methods LTE is compared with (GRIFFIN, TEAL, CATS, MoEfication, Sparse Expansion), as restorable model
transforms with one interface:

    handle = METHODS[name](model, target_sparsity, calibration_batches, cache=cache)  # hooks installed
    ...                                                                    # evaluate the model
    handle.remove()                                                        # the model as it was

``cache`` (a dict per method and model, optional) keeps what a method measured on the
calibration data between targets. ``handle`` (:class:`~lte.compare.baselines.sites.Sparsified`) also
reports the realised per-layer FFN sparsity and FFN FLOPs per token of what ran. ``lte compare``
(:mod:`lte.compare`) runs them side by side with LTE and the dense model.
"""

from __future__ import annotations

from functools import partial

from . import cats, griffin, moefication, sparse_expansion, teal
from .sites import Sparsified, dense_ffn_flops_per_token, ffn_sites


def dense(model, target_sparsity=0.0, calibration=None, cache=None) -> Sparsified:
    """The unmodified model (the reference row)."""
    return Sparsified("dense", model)


METHODS = {
    "dense": dense,
    "griffin": griffin.apply,
    "teal": teal.apply,
    "teal_all": partial(teal.apply, attention=True),
    "cats": cats.apply,
    "moefication": moefication.apply,
    "sparse_expansion": sparse_expansion.apply,
}

__all__ = ["METHODS", "Sparsified", "dense_ffn_flops_per_token", "ffn_sites"]
