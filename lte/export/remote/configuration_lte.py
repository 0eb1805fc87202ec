"""Configuration of an exported LTE model: the base model's configuration plus the routing.

``lte export`` rewrites the ``BASE_ARCHITECTURE`` line to the class of the trained model
(``LlamaForCausalLM``, ``GPT2LMHeadModel``...) and ``BASE_MODEL_TYPE`` to its configuration's
``model_type``. The two differ in name for aliases (``sarvam_moe`` configurations run
``Glm4MoeForCausalLM``): the configuration class, and the checkpoint's weight names, follow the
model type. ``LTEConfig`` then accepts every field of that configuration, and adds:

* ``lte_routing``: ``"hard"`` (each token runs the experts its router selects) or ``"dense"``
  (every expert runs; the fine-tuned model without routing, for comparison). Exports written
  before the rename say ``lte_mode``: ``"sparse"`` (= ``"hard"``) or ``"dense"``; they still load,
  and ``config.lte_mode`` still reads and sets it, with a warning, for one release;
* ``lte_thresholds``: one threshold per FFN layer on the router score ``sigmoid(router(x))``;
  an expert runs when its score is above it (a negative threshold runs every expert);
* ``lte_ffn``: where the FFNs are and their shape (written by ``lte export``): ``expert_size``,
  ``router_bias`` and ``hosts``, one ``{"path", "first", "down", "fused_chunks"}`` per FFN
  (``first``: the projections producing neurons, in call order; ``first[0]`` owns the router);
* ``lte_track_sparsity``: count the experts each layer skips (``lte generate`` reads them);
* ``lte_format_version``: where the routers are (``layout.py``): 2, in ``lte/routers.safetensors``;
  absent (format 1), inside the model weights. ``save_pretrained`` always writes format 2.
"""

import warnings

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten by `lte export`
BASE_MODEL_TYPE = "llama"  # rewritten by `lte export`

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_ROUTING_OF_OLD_MODE = {"sparse": "hard", "dense": "dense"}  # lte_mode (until 0.1) -> lte_routing


def _warn_lte_mode():
    warnings.warn(
        "config.lte_mode is deprecated, use config.lte_routing ('hard' or 'dense')", DeprecationWarning, stacklevel=3
    )


class LTEConfig(_BaseConfig):
    # The base model's type: config.json says "llama" (say), so plain loaders and every tool that
    # knows the architecture use the base class; ``auto_map`` sends trust_remote_code=True here.
    model_type = _BaseConfig.model_type

    def __init__(self, lte_routing="hard", lte_thresholds=None, lte_ffn=None, lte_track_sparsity=False, **kwargs):
        if "lte_mode" in kwargs:  # config.json of an export written before the rename
            _warn_lte_mode()
            old = kwargs.pop("lte_mode")
            lte_routing = _ROUTING_OF_OLD_MODE.get(old, old)
        self.lte_routing = lte_routing
        self.lte_thresholds = list(lte_thresholds or [])
        self.lte_ffn = dict(lte_ffn or {})
        self.lte_track_sparsity = lte_track_sparsity
        super().__init__(**kwargs)

    @property
    def lte_mode(self):
        """Deprecated: ``"sparse"`` or ``"dense"``; use :attr:`lte_routing` (``"hard"`` or ``"dense"``)."""
        _warn_lte_mode()
        return {routing: mode for mode, routing in _ROUTING_OF_OLD_MODE.items()}.get(self.lte_routing, self.lte_routing)

    @lte_mode.setter
    def lte_mode(self, value):
        _warn_lte_mode()
        self.lte_routing = _ROUTING_OF_OLD_MODE.get(value, value)
