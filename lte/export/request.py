"""``lte export``'s request: the recipe's export settings applied to one run. Kept apart from the
exporter, which imports torch and transformers, so the command's flags and its checks load fast."""

from __future__ import annotations

import dataclasses

from ..core.errors import UsageError
from ..core.outputs import check_out
from ..core.record import split_sources
from ..core.run_dir import stage2_model
from ..training.export_args import ExportArgs


@dataclasses.dataclass(kw_only=True)
class ExportRequest(ExportArgs):
    """``lte export``: the recipe's export settings (:class:`~lte.training.export_args.ExportArgs`, the same fields
    and defaults) applied to one run; its fields are the command's flags (:mod:`lte.core.cli_args`)."""

    run_dir: str = dataclasses.field(
        metadata={"help": "output_dir of an `lte train` run (uses RUN_DIR/stage2/model)", "positional": True}
    )
    out: str = dataclasses.field(metadata={"help": "Directory to write the exported checkpoint to."})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "Replace --out if it exists."})

    @classmethod
    def of_recipe(cls, recipe, **fields) -> ExportRequest:
        """The request of a recipe's export stage (``fields``: ``out``, ``overwrite``)."""
        settings = {f.name: getattr(recipe.export, f.name) for f in dataclasses.fields(ExportArgs)}
        return cls(**{**settings, "out": "", "run_dir": str(recipe.output_dir), **fields})

    def label(self, key: str) -> str:
        return f"--{key.replace('_', '-')} "

    def validate(self) -> None:
        if self.target_sparsity is None and self.max_ppl_increase is None:
            raise UsageError("give one of --target-sparsity S or --max-ppl-increase P")
        super().validate()
        if self.calibration is not None:
            from ..training.data import check_source

            check_source(self.calibration, "--calibration")
        model = stage2_model(self.run_dir)  # raises if the run has no stage-2 model
        from ..training.config import load_run_recipe

        recipe = load_run_recipe(self.run_dir)
        check_out(
            self.out,
            "export",
            overwrite=self.overwrite,
            runs={"the run": self.run_dir},
            inputs={
                "the run's stage-2 model": model,
                **{f"--calibration ({p})": p for p in split_sources(self.calibration)},
                "the run's model (its tokenizer)": recipe.model.name_or_path,
                **{f"the run's data.eval ({p})": p for p in split_sources(recipe.data.eval)},
                **{f"the run's data.train ({p})": p for p in split_sources(recipe.data.train)},
            },
        )

    def settings(self) -> dict:
        """What the export's thresholds depend on, besides the run's stage-2 model (kept in its marker)."""
        from ..core.record import resolve_sources

        return {
            "target_sparsity": self.target_sparsity,
            "max_ppl_increase": self.max_ppl_increase,
            "allocation": self.allocation,
            "calibration": resolve_sources(self.calibration),
            "calibration_tokens": self.calibration_tokens,
            # only when set: the exports written before the key existed keep matching their settings
            **({"quantize": self.quantize} if self.quantize is not None else {}),
        }
