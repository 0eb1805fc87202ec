"""``LTETrainer``: a thin ``transformers.Trainer`` that adds LTE's losses and sparsity metrics.

The model is an ordinary causal LM whose FFNs were wrapped by :func:`lte.model.inject.inject_lte`.
``compute_loss`` runs the usual task loss through ``super()`` inside a router-score scope,
then (with ``soft`` routing) adds ``eta * L_eff + lam * L_sep``. Gradient accumulation: when the
task loss is normalised over the whole accumulated batch (``num_items_in_batch``), the
Trainer does not divide by the accumulation steps, so the per-micro-batch regularisers are
divided here; otherwise the Trainer divides everything. Either way the router gradients do
not depend on the number of accumulation steps.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from typing_extensions import override

from ..core.errors import UsageError
from ..core.faults import fault_point
from ..core.imports import hidden
from ..model.layers import ROUTER_PREFIX, collect_router_scores
from .arguments import LTEArguments, LTETrainingArguments  # noqa: F401  (LTEArguments: re-exported)
from .losses import efficiency_loss, layer_sparsity, separability_loss

with hidden("bitsandbytes"):  # as in .arguments: transformers' Trainer imports peft, which imports bitsandbytes
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState


class EtaController(TrainerCallback, ExportableState):
    """Stage 1's sparsity target: ``eta`` as the Lagrange multiplier of "sparsity = target".

    The efficiency loss alone sets no particular sparsity: where stage 1 settles depends on eta,
    on the router init and on the separability loss, which locks each router score on the side of
    the threshold it starts from (on stories260K a calibrated init at 46% ended at 37%, one at 52% at 56%).
    Dual ascent on the constraint "sparsity = target" fixes that: after every optimizer step eta
    grows while the measured hard-routing sparsity is below the target and shrinks while it is
    above, past 0 if need be (a negative eta rewards router scores, which is what it takes to
    unlock experts the separability loss holds off). The efficiency loss still decides which
    tokens, experts and layers are skipped; the controller only sets how many.
    Its ``eta`` is saved in checkpoints (``ExportableState``), so a resumed stage continues with it.
    """

    def __init__(self, eta: float, target: float, step: float):
        self.eta, self.target, self.step = float(eta), float(target), float(step)
        self._observed: list[torch.Tensor] = []

    def observe(self, sparsity: torch.Tensor) -> None:
        """One micro-batch's mean FFN sparsity (kept on device: no host sync per forward)."""
        self._observed.append(sparsity.detach().float())

    @override
    def on_step_end(self, args, state, control, **kwargs):
        if self._observed:
            sparsity = torch.stack(self._observed).mean().item()
            self._observed.clear()
            self.eta += self.step * (self.target - sparsity)

    def state(self) -> dict:
        return {"args": {"eta": self.eta, "target": self.target, "step": self.step}, "attributes": {}}


class TrainingDiverged(UsageError):
    """The loss became NaN/inf at optimizer step ``step``; the last checkpoint on disk is left as it
    was. The pipeline re-raises it with the recipe key of the stage's learning rate."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step, self.loss = step, loss


class LTETrainer(Trainer):
    """Trainer for one LTE stage; the stage is ``args.lte_routing``."""

    args: LTETrainingArguments

    def __init__(self, *args, teacher=None, **kwargs):
        """``teacher``: the original dense model, for the distillation losses (frozen, never saved)."""
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.args.distills and teacher is None:
            raise ValueError("distill_weight > 0 or distill_hidden_weight > 0 needs the original model as `teacher`")
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        if self.args.lte_routing == "soft" and self.args.target_sparsity is not None:
            self.add_callback(EtaController(self.args.eta, self.args.target_sparsity, self.args.eta_step))

    @property
    def eta_controller(self) -> EtaController | None:
        """Looked up each time: resuming replaces the callback with one rebuilt from the checkpoint."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, EtaController)), None)

    @property
    def eta(self) -> float:
        controller = self.eta_controller
        return controller.eta if controller is not None else self.args.eta

    def _prepare_teacher(self, teacher):
        """Shard the frozen teacher the way the student is (TRL's reference-model helpers)."""
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return teacher.to(self.accelerator.device).eval()

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distill_hidden = self.teacher is not None and self.args.distill_hidden_weight > 0
        if distill_hidden:
            inputs = {**inputs, "output_hidden_states": True}
        with collect_router_scores() as records:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        split = "train" if model.training else "eval"
        metrics = self._metrics[split]
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = self.current_gradient_accumulation_steps if (scaled_for_ga and model.training) else 1
        if scaled_for_ga and self.args.average_tokens_across_devices:
            task = loss.detach() * steps / self.accelerator.num_processes
        else:
            task = loss.detach()
        metrics["task_loss"].append(task)
        if self.teacher is not None and self.args.distills:
            with torch.no_grad():
                teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"})
            if self.args.distill_weight > 0:
                kl = self._distillation_kl(inputs, outputs.logits, teacher_out.logits)
                metrics["distill_kl"].append(kl.detach())
                alpha = self.args.distill_weight
                loss = (1 - alpha) * loss + alpha * kl / steps
            if distill_hidden:
                hidden = self._hidden_state_error(inputs, outputs.hidden_states, teacher_out.hidden_states)
                metrics["distill_hidden"].append(hidden.detach())
                loss = loss + self.args.distill_hidden_weight * hidden / steps
        if records:
            mask = inputs.get("attention_mask")
            per_layer = layer_sparsity(records, mask)
            metrics["sparsity"].append(per_layer.mean())
            metrics["sparsity/layer"].append(per_layer)
            if self.args.lte_routing == "soft":
                eff = efficiency_loss(records, mask, self.args.efficiency_loss)
                sep = separability_loss(records, mask, self.args.sep_eps)
                metrics["efficiency_loss"].append(eff.detach())
                metrics["separability_loss"].append(sep.detach())
                eta = self.eta
                loss = loss + (eta * eff + self.args.lam * sep) / steps
                controller = self.eta_controller
                if controller is not None and model.training:
                    # every process must steer by the same number, or their eta would drift apart
                    controller.observe(self.accelerator.reduce(per_layer.mean().float(), "mean"))
                    metrics["eta"].append(torch.tensor(eta, device=per_layer.device))
        if model.training and not torch.isfinite(loss.detach()).all():
            step, value = self.state.global_step + 1, loss.detach().float().max().item()
            raise TrainingDiverged(
                f"the loss became {value} at step {step} of the {self.args.lte_routing}-routing stage "
                f"({self.args.output_dir}); nothing was saved from this step. Lower the learning rate "
                f"(now {self.args.learning_rate:g}) and train this stage again from its start: its checkpoints "
                f"carry the old rate in their optimizer and scheduler state",
                step=step,
                loss=value,
            )
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _distillation_kl(inputs, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Mean KL(teacher || student) of the next-token distributions over label positions."""
        valid = inputs["labels"][:, 1:] != -100
        student = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)
        teacher = torch.log_softmax(teacher_logits[:, :-1][valid].float(), dim=-1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

    @staticmethod
    def _hidden_state_error(inputs, hidden, teacher_hidden) -> torch.Tensor:
        """Mean over decoder layers of ||h - h_teacher||^2 / ||h_teacher||^2 over real tokens
        (the embeddings, index 0, are left out)."""
        mask = inputs.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        errors = []
        for h, h_teacher in zip(hidden[1:], teacher_hidden[1:], strict=True):
            h, h_teacher = h[real].float(), h_teacher[real].float()
            errors.append((h - h_teacher).square().mean() / h_teacher.square().mean().clamp_min(1e-12))
        return torch.stack(errors).mean()

    @override
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the LTE metrics since the last log into ``logs``: each is averaged over the steps
        on this process, then over processes. They are kept as device tensors until here, so the
        training step itself never waits for the host."""
        split = "train" if self.model.training else "eval"
        metrics = self._metrics[split]
        prefix = "eval_" if split == "eval" else ""
        for key, values in metrics.items():
            if not values:
                continue
            local = torch.stack([v.float().to(self.accelerator.device) for v in values]).mean(dim=0)
            value = self.accelerator.gather(local[None]).mean(dim=0)
            if key == "sparsity/layer":
                for layer, layer_value in enumerate(value.tolist()):
                    logs[f"{prefix}sparsity/layer_{layer:02d}"] = round(layer_value, 4)
            else:
                logs[f"{prefix}{key}"] = value.item()
        metrics.clear()
        super().log(logs, start_time)

    @override
    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        fault_point(f"{Path(self.args.output_dir).name}:checkpoint{self.state.global_step}")  # test-only

    @override
    def create_optimizer(self, model=None):
        """Give the routers their own learning rate when ``router_learning_rate`` is set."""
        optimizer = super().create_optimizer(model)
        router_lr = self.args.router_learning_rate
        if router_lr is None or getattr(self, "_routers_regrouped", False):
            return optimizer
        opt_model = self.model if model is None else model
        router_params = {id(p) for n, p in opt_model.named_parameters() if ROUTER_PREFIX in n and p.requires_grad}
        if router_params:
            moved = []
            for group in optimizer.param_groups:
                keep = [p for p in group["params"] if id(p) not in router_params]
                moved += [(p, group["weight_decay"]) for p in group["params"] if id(p) in router_params]
                group["params"] = keep
            for decay in sorted({wd for _, wd in moved}):
                optimizer.add_param_group(
                    {"params": [p for p, wd in moved if wd == decay], "weight_decay": decay, "lr": router_lr}
                )
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        self._routers_regrouped = True
        return optimizer
