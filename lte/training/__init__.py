"""Training: the recipe schema and arguments, data, losses, the thin ``Trainer`` subclass, evaluation,
LoRA adapters, multi-process helpers, and the checks and loaders the stages share.
Imports only :mod:`lte.model` and :mod:`lte.core` from the rest of ``lte``."""

from ..core.imports import hidden

# transformers' Trainer and TrainingArguments import peft, and peft imports bitsandbytes eagerly: import
# peft here, first, without it (lte.core.imports.hidden says why); QLoRA imports it when it loads a 4-bit model.
with hidden("bitsandbytes"):
    import peft  # noqa: F401
