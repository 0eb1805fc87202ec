"""Configuration of an exported LTE model: the base model's configuration plus the routing.

``lte export`` rewrites the ``BASE_ARCHITECTURE`` line to the class of the trained model
(``LlamaForCausalLM``, ``GPT2LMHeadModel``...). ``LTEConfig`` then accepts every field of
that model's configuration, and adds:

* ``lte_mode``: ``"sparse"`` (each token runs the experts its router selects) or ``"dense"``
  (every expert runs; the fine-tuned model without routing, for comparison);
* ``lte_thresholds``: one threshold per FFN layer on the router score ``sigmoid(router(x))``;
  an expert runs when its score is above it (a negative threshold runs every expert);
* ``lte_ffn``: where the FFNs are and their shape (written by ``lte export``): ``expert_size``,
  ``router_bias`` and ``hosts``, one ``{"path", "first", "down", "fused_chunks"}`` per FFN
  (``first``: the projections producing neurons, in call order; ``first[0]`` owns the router);
* ``lte_track_sparsity``: count the experts each layer skips (``lte generate`` reads them).
"""

import transformers

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten by `lte export`

_BaseConfig = getattr(transformers, BASE_ARCHITECTURE).config_class


class LTEConfig(_BaseConfig):
    # The base model's type: config.json says "llama" (say), so plain loaders and every tool that
    # knows the architecture use the base class; ``auto_map`` sends trust_remote_code=True here.
    model_type = _BaseConfig.model_type

    def __init__(self, lte_mode="sparse", lte_thresholds=None, lte_ffn=None, lte_track_sparsity=False, **kwargs):
        self.lte_mode = lte_mode
        self.lte_thresholds = list(lte_thresholds or [])
        self.lte_ffn = dict(lte_ffn or {})
        self.lte_track_sparsity = lte_track_sparsity
        super().__init__(**kwargs)
