"""Training: the recipe schema and arguments, data, losses, the thin ``Trainer`` subclass, evaluation,
LoRA adapters, multi-process helpers, and the checks and loaders the stages share.
Imports only :mod:`lte.model` and :mod:`lte.core` from the rest of ``lte``."""
