"""lte: Learn-To-be-Efficient fine-tuning for Hugging Face causal LMs.

Public API (PEFT-style): ``inject_lte`` / ``unload_lte`` wrap a model's FFNs with routers,
``LTETrainer`` / ``LTETrainingArguments`` train them, ``save_lte`` / ``load_lte`` persist them.
Heavy imports happen on first attribute access, so ``lte --help`` stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "UsageError": "core.errors",
    "FFNSpec": "model.registry",
    "register_ffn": "model.registry",
    "detect_layout": "model.detect",
    "LTEMLP": "model.layers",
    "collect_router_scores": "model.layers",
    "LTEModelConfig": "model.inject",
    "inject_lte": "model.inject",
    "unload_lte": "model.inject",
    "set_lte_routing": "model.inject",
    "set_lte_mode": "model.inject",  # deprecated name of set_lte_routing
    "save_lte": "model.inject",
    "load_lte": "model.inject",
    "lte_layers": "model.inject",
    "LTEArguments": "training.arguments",
    "LTETrainer": "training.trainer",
    "LTETrainingArguments": "training.arguments",
    "load_recipe": "training.config",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lte' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
