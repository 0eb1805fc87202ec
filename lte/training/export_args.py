"""The recipe's ``export.*`` group (:class:`ExportArgs`), apart from the rest of the schema so that
``lte export`` builds its flags and checks them without importing transformers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from ..core.cli_args import fraction, positive_float, positive_int
from ..core.errors import UsageError

# How the export spreads its target sparsity over the layers (lte.export.thresholds implements them).
ALLOCATIONS = ("tuned", "uniform")
# Weight-only quantization of the export (lte.export.quantize implements them).
QUANT_SCHEMES = ("int8", "int4")


@dataclass
class ExportArgs:
    """The export settings: the recipe's ``export.*`` group (the export stage after training; off
    unless ``target_sparsity`` or ``max_ppl_increase`` is set), and, with the run and ``--overwrite``,
    ``lte export``'s request (:class:`lte.export.ExportRequest`, whose flags are these fields)."""

    target_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of FFN neurons to skip per token, in [0, 1): the sparsity the thresholds are tuned to.",
            "type": fraction,
            "one_of": "target",
        },
    )
    max_ppl_increase: float | None = field(
        default=None,
        metadata={
            "help": "Or: export the highest sparsity whose calibration ppl stays within P% of all experts'.",
            "type": positive_float,
            "metavar": "P",
            "one_of": "target",
        },
    )
    allocation: str = field(
        default="tuned",
        metadata={
            "help": "Per-layer sparsity: tuned by layer sensitivity, or uniform (the same for every layer).",
            "choices": list(ALLOCATIONS),
        },
    )
    calibration: str | None = field(
        default=None, metadata={"help": "Calibration text file (default: the run's training data)."}
    )
    calibration_tokens: int = field(default=32768, metadata={"help": "Calibration tokens.", "type": positive_int})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "Store the Linear weights (not lm_head) as int8 or int4 (groups of 32, compressed-tensors' "
            "pack-quantized format; loaders need the compressed-tensors package). Thresholds are tuned on them.",
            "choices": list(QUANT_SCHEMES),
        },
    )
    out: str | None = field(default=None, metadata={"help": "Export directory; default OUTPUT_DIR/export."})

    @property
    def enabled(self) -> bool:
        return self.target_sparsity is not None or self.max_ppl_increase is not None

    def label(self, key: str) -> str:
        """How a message names ``key``: the recipe's ``export.KEY=`` (``lte export`` names its flags)."""
        return f"export.{key}="

    def validate(self) -> None:
        name = self.label
        if self.target_sparsity is not None and self.max_ppl_increase is not None:
            raise UsageError(f"set only one of {name('target_sparsity')}S and {name('max_ppl_increase')}P")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise UsageError(
                f"{name('target_sparsity')}{self.target_sparsity} must lie in [0, 1) (0.5 skips half the FFN neurons)"
            )
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise UsageError(
                f"{name('max_ppl_increase')}{self.max_ppl_increase} must be a positive percentage (5 means +5%)"
            )
        if self.allocation not in ALLOCATIONS:
            raise UsageError(
                f"{name('allocation')}{self.allocation!r} must be one of {', '.join(map(repr, ALLOCATIONS))}"
            )
        if self.quantize is not None and self.quantize not in QUANT_SCHEMES:
            raise UsageError(
                f"{name('quantize')}{self.quantize!r} must be one of {', '.join(map(repr, QUANT_SCHEMES))}"
            )
        if self.quantize is not None and importlib.util.find_spec("compressed_tensors") is None:
            raise UsageError(
                f"{name('quantize')}{self.quantize} writes compressed-tensors' format and needs its package: "
                f"pip install compressed-tensors (or pip install 'lte[quant]')"
            )
        if self.calibration_tokens < 1:
            raise UsageError(f"{name('calibration_tokens')}{self.calibration_tokens} must be positive")
