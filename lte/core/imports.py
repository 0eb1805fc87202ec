"""Optional dependencies that other packages import eagerly, kept out of runs that do not use them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hidden(module: str) -> Iterator[None]:
    """Imports of ``module`` inside the block fail as if it were not installed (``sys.modules`` maps
    it to None, Python's own marker for a blocked import); nothing changes when it is already loaded.

    peft imports bitsandbytes at its own import (``peft.helpers``) and in its LoRA dispatch, and
    transformers' training stack imports peft: without this, every ``lte``/``train.py`` command
    loaded bitsandbytes, whose CPU backend on AVX512-BF16 machines asks the hub for a kernel at
    import and logs a warning when offline. Code that quantizes (QLoRA's 4-bit loading, 8-bit
    optimizers) runs outside such a block and imports it then."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None
    try:
        yield
    finally:
        if sys.modules.get(module, False) is None:
            del sys.modules[module]
