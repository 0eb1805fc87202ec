"""The arguments of an LTE run: ``LTEArguments`` (the recipe's ``lte.*`` group, a plain dataclass)
and ``LTETrainingArguments`` (``TrainingArguments`` plus those fields and the stage's routing mode).

They live apart from :mod:`lte.training.trainer` so that the recipe schema (:mod:`lte.training.config`)
reads them without importing transformers' ``Trainer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..core.errors import UsageError, renamed_kwargs
from ..core.imports import hidden
from ..model.inject import LTELayerSettings
from ..model.layers import ROUTINGS
from ..model.router_init import ROUTER_INITS

# transformers' TrainingArguments imports peft, and peft imports bitsandbytes eagerly (lte.core.imports.hidden
# says why not): peft is imported here without it; QLoRA imports bitsandbytes when it loads a 4-bit model.
with hidden("bitsandbytes"):
    from transformers import TrainingArguments


@renamed_kwargs(tau="threshold")
@dataclass
class LTEArguments(LTELayerSettings):
    """LTE's own settings (the recipe's ``lte.*`` group): the layers' (inherited from
    :class:`~lte.model.inject.LTELayerSettings`, which ``lte_config.json`` saves) and training's."""

    eta: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the efficiency loss: the sparsity knob (>= 0); "
            "the starting value when target_sparsity is set."
        },
    )
    target_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Stage 1 steers eta so that the FFN sparsity "
            "under hard routing settles at this value (None: eta stays fixed, the paper's setting)."
        },
    )
    eta_step: float = field(
        default=1.0,
        metadata={
            "help": "How fast eta follows target_sparsity: after every optimizer "
            "step, eta += eta_step * (target_sparsity - measured sparsity); eta may turn negative."
        },
    )
    lam: float = field(default=0.5, metadata={"help": "Weight of the separability loss (lambda in the paper, >= 0)."})
    sep_eps: float = field(
        default=1e-2, metadata={"help": "eps in 1/((G - threshold)^2 + eps); keeps L_sep finite at G = threshold."}
    )
    efficiency_loss: str = field(
        default="l2", metadata={"help": "'l2': mean(G^2) as in the paper's Eq. 4; 'l1': mean(G)."}
    )
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the routers (default: the model's)."}
    )
    router_init_tokens: int = field(
        default=16384, metadata={"help": "Training tokens used by the calibrated router init."}
    )
    router_init_sparsity: float = field(
        default=0.5, metadata={"help": "Share of (token, expert) pairs the calibrated init labels as not needed."}
    )
    router_init_steps: int = field(
        default=200, metadata={"help": "Logistic-regression steps of the calibrated router init."}
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "alpha in (1 - alpha) * task + alpha * KL(original || "
            "LTE model) over next-token distributions, in stages 1 and 2 (0: the paper's task loss only)."
        },
    )
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "beta: adds beta * the mean over decoder "
            "layers of ||h - h_original||^2 / ||h_original||^2 (every layer's output against the "
            "original model's), in stages 1 and 2: a target for every layer, not only the logits."
        },
    )
    kmeans_iters: int = field(default=10, metadata={"help": "Balanced k-means iterations for expert grouping."})
    train_moe_router: bool = field(
        default=False,
        metadata={
            "help": "MoE models: train the model's own expert router in stages 1 and 2 (default: frozen, so each "
            "token keeps the experts the original model chose, which the per-expert groups and LTE routers were "
            "fitted to, and no load-balancing loss is needed)."
        },
    )
    stage0_steps: int = field(
        default=0, metadata={"help": "Dense fine-tuning steps before grouping (0 skips stage 0)."}
    )
    stage1_steps: int = field(default=100, metadata={"help": "Stage 1 steps (soft routing + regularisers)."})
    stage2_steps: int = field(default=100, metadata={"help": "Stage 2 steps (hard routing, routers frozen)."})

    def validate(self) -> None:
        problems = [
            f"lte.{name}={value} must be a finite number"
            for name, value in vars(self).items()
            if isinstance(value, float) and not math.isfinite(value)
        ]
        if self.eta < 0:
            problems.append(f"lte.eta={self.eta} must be >= 0 (it weighs the efficiency loss)")
        if self.target_sparsity is not None and not 0 < self.target_sparsity < 1:
            problems.append(f"lte.target_sparsity={self.target_sparsity} must lie in (0, 1) (or null for a fixed eta)")
        if self.eta_step <= 0:
            problems.append(f"lte.eta_step={self.eta_step} must be > 0")
        if self.lam < 0:
            problems.append(f"lte.lam={self.lam} must be >= 0 (it weighs the separability loss)")
        if not 0 < self.threshold < 1:
            problems.append(f"lte.threshold={self.threshold} must lie in (0, 1): router scores are sigmoids")
        if self.sep_eps <= 0:
            problems.append(f"lte.sep_eps={self.sep_eps} must be > 0")
        if self.efficiency_loss not in ("l1", "l2"):
            problems.append(f"lte.efficiency_loss={self.efficiency_loss!r} must be 'l1' or 'l2'")
        if self.expert_size < 1:
            problems.append(f"lte.expert_size={self.expert_size} must be >= 1")
        if self.router_learning_rate is not None and self.router_learning_rate <= 0:
            problems.append(f"lte.router_learning_rate={self.router_learning_rate} must be > 0")
        for stage in ("stage0_steps", "stage1_steps", "stage2_steps"):
            if getattr(self, stage) < 0:
                problems.append(f"lte.{stage}={getattr(self, stage)} must be >= 0")
        if not 0 <= self.distill_weight <= 1:
            problems.append(f"lte.distill_weight={self.distill_weight} must lie in [0, 1]")
        if self.distill_hidden_weight < 0:
            problems.append(f"lte.distill_hidden_weight={self.distill_hidden_weight} must be >= 0")
        if self.router_init not in ROUTER_INITS:
            problems.append(f"lte.router_init={self.router_init!r} must be {', '.join(map(repr, ROUTER_INITS))}")
        if not 0 < self.router_init_sparsity < 1:
            problems.append(f"lte.router_init_sparsity={self.router_init_sparsity} must lie in (0, 1)")
        if self.router_init_tokens < 1 or self.router_init_steps < 1:
            problems.append("lte.router_init_tokens and lte.router_init_steps must be >= 1")
        if self.kmeans_iters < 1:
            problems.append(f"lte.kmeans_iters={self.kmeans_iters} must be >= 1")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def distills(self) -> bool:
        """Whether a stage needs the original model as a teacher."""
        return self.distill_weight > 0 or self.distill_hidden_weight > 0


@renamed_kwargs(tau="threshold", lte_mode="lte_routing")
@dataclass
class LTETrainingArguments(TrainingArguments, LTEArguments):
    """``TrainingArguments`` plus the LTE fields, plus the routing this stage trains with."""

    lte_routing: str = field(default="soft", metadata={"help": "dense (stage 0), soft (stage 1) or hard (stage 2)."})
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "Resume callbacks' state too (on here: the eta controller's eta lives there)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lte_routing not in ROUTINGS:
            raise ValueError(f"lte_routing must be one of {ROUTINGS}, got {self.lte_routing!r}")
