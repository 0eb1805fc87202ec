"""lte: Learn-To-be-Efficient fine-tuning for Hugging Face causal LMs.

Public API (PEFT-style): ``inject_lte`` / ``unload_lte`` wrap a model's FFNs with routers,
``LTETrainer`` / ``LTETrainingArguments`` train them, ``save_lte`` / ``load_lte`` persist them.
Heavy imports happen on first attribute access, so ``lte --help`` stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "UsageError": "errors",
    "FFNSpec": "registry",
    "register_ffn": "registry",
    "detect_layout": "detect",
    "LTEMLP": "layers",
    "collect_router_scores": "layers",
    "LTEModelConfig": "inject",
    "inject_lte": "inject",
    "unload_lte": "inject",
    "set_lte_routing": "inject",
    "set_lte_mode": "inject",  # deprecated name of set_lte_routing
    "save_lte": "inject",
    "load_lte": "inject",
    "lte_layers": "inject",
    "LTEArguments": "trainer",
    "LTETrainer": "trainer",
    "LTETrainingArguments": "trainer",
    "load_recipe": "config",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lte' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
