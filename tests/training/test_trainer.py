"""LTETrainer: gradient-accumulation invariance, checkpointing, metrics, router LR, NaN stop."""

import math

import pytest
import torch
from datasets import Dataset

from conftest import tiny_model
from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing
from lte.model.layers import collect_router_scores
from lte.training.trainer import EtaController, LTETrainer, LTETrainingArguments, TrainingDiverged


def packed_dataset(n=8, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def lte_model(expert_size=8):
    model = inject_lte(tiny_model("llama"), LTEModelConfig(expert_size=expert_size), seed=3, progress=False)
    set_lte_routing(model, "soft")
    return model.train()


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        eta=1.0,
        lam=0.5,
        dataloader_drop_last=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return LTETrainingArguments(**base)


def router_after_one_step(tmp_path, batch, accumulation, **kw):
    model = lte_model()
    trainer = LTETrainer(
        model=model,
        args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **kw),
        train_dataset=packed_dataset(),
    )
    before = lte_layers(model)[0].lte_router.weight.detach().clone()
    trainer.train()
    return lte_layers(model)[0].lte_router.weight.detach() - before


def test_router_update_does_not_depend_on_gradient_accumulation(tmp_path):
    """8 sequences per optimizer step, as 1x8, 2x4 or 4x2: the same router update (SGD, so update = lr * grad)."""
    reference = router_after_one_step(tmp_path / "a", 8, 1)
    assert reference.abs().max() > 1e-6
    for batch, accumulation in ((4, 2), (2, 4)):
        update = router_after_one_step(tmp_path / f"b{batch}", batch, accumulation)
        torch.testing.assert_close(update, reference, atol=1e-6, rtol=1e-4)


def test_router_scores_are_recorded_once_under_activation_checkpointing(tmp_path):
    model = lte_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = torch.tensor(packed_dataset()["input_ids"][:2])
    with collect_router_scores() as records:
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()  # the recompute runs the routers again, outside the collection scope
    assert len(records) == 2


def test_metrics_are_logged_and_stage1_regularisers_change_the_loss(tmp_path):
    trainer = LTETrainer(
        model=lte_model(),
        args=args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=packed_dataset(),
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "task_loss" in h]
    assert len(logged) == 2
    entry = logged[0]
    for key in ("efficiency_loss", "separability_loss", "sparsity", "sparsity/layer_00", "sparsity/layer_01"):
        assert key in entry
    assert 0.0 <= entry["sparsity"] <= 1.0
    expected = entry["task_loss"] + 1.0 * entry["efficiency_loss"] + 0.5 * entry["separability_loss"]
    assert entry["loss"] == pytest.approx(expected, rel=1e-3)


def test_hard_stage_logs_no_regularisers(tmp_path):
    model = lte_model()
    set_lte_routing(model, "hard")
    trainer = LTETrainer(
        model=model,
        args=args(tmp_path, per_device_train_batch_size=4, lte_routing="hard"),
        train_dataset=packed_dataset(),
    )
    trainer.train()
    entry = next(h for h in trainer.state.log_history if "task_loss" in h)
    assert "efficiency_loss" not in entry and "sparsity" in entry
    assert entry["loss"] == pytest.approx(entry["task_loss"], rel=1e-4)


def test_router_learning_rate_gets_its_own_param_group(tmp_path):
    model = lte_model()
    trainer = LTETrainer(model=model, args=args(tmp_path, router_learning_rate=0.5), train_dataset=packed_dataset())
    optimizer = trainer.create_optimizer()
    router_ids = {id(p) for layer in lte_layers(model) for p in layer.lte_router.parameters()}
    router_groups = [g for g in optimizer.param_groups if any(id(p) in router_ids for p in g["params"])]
    assert router_groups and all(g["lr"] == 0.5 for g in router_groups)
    assert all(id(p) in router_ids for g in router_groups for p in g["params"])
    other = [g for g in optimizer.param_groups if g not in router_groups]
    assert other and all(g["lr"] == 1e-2 for g in other)


def test_nan_loss_stops_with_the_step(tmp_path):
    model = lte_model()
    with torch.no_grad():
        lte_layers(model)[0].lte_router.weight.fill_(math.nan)
    trainer = LTETrainer(
        model=model, args=args(tmp_path, per_device_train_batch_size=4), train_dataset=packed_dataset()
    )
    with pytest.raises(TrainingDiverged, match="at step 1 of the soft-routing stage"):
        trainer.train()


def distillation_setup(tmp_path, **distill):
    """An LTE model in dense mode, its identical original as the teacher, a trainer with only the
    distillation terms of ``distill`` switched on (and the task loss), and one batch."""
    teacher = tiny_model("llama")
    model = inject_lte(tiny_model("llama"), LTEModelConfig(expert_size=8), progress=False)
    set_lte_routing(model, "dense")
    trainer = LTETrainer(
        model=model.train(),
        args=args(tmp_path, per_device_train_batch_size=4, lam=0.0, eta=0.0, lte_routing="dense", **distill),
        train_dataset=packed_dataset(),
        teacher=teacher,
    )
    return teacher, model, trainer, trainer.data_collator([packed_dataset()[i] for i in range(4)])


def test_distillation_to_the_original_model(tmp_path):
    """distill_weight=1: the loss is KL(original || LTE model); against an identical dense copy it is zero."""
    _teacher, model, trainer, batch = distillation_setup(tmp_path, distill_weight=1.0)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # now the student differs from the teacher
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
    loss = trainer.compute_loss(model, batch)
    assert loss.item() > 1e-3
    assert trainer._metrics["train"]["distill_kl"][-1] == pytest.approx(loss.item(), rel=1e-4)


def test_eta_controller_follows_the_target_both_ways():
    controller = EtaController(eta=1.0, target=0.5, step=2.0)
    controller.observe(torch.tensor(0.4))
    controller.observe(torch.tensor(0.2))  # micro-batches of one optimizer step are averaged
    controller.on_step_end(None, None, None)
    assert controller.eta == pytest.approx(1.0 + 2.0 * (0.5 - 0.3))
    controller.observe(torch.tensor(1.0))
    controller.on_step_end(None, None, None)
    assert controller.eta == pytest.approx(1.4 - 1.0)
    controller.observe(torch.tensor(1.0))
    controller.on_step_end(None, None, None)  # sparser than the target: eta turns negative
    assert controller.eta == pytest.approx(0.4 - 1.0)
    controller.on_step_end(None, None, None)  # nothing observed (e.g. a step of padding only): unchanged
    assert controller.eta == pytest.approx(-0.6)


def test_target_sparsity_steers_eta_and_is_resumed(tmp_path):
    """eta moves by eta_step * (target - measured sparsity) per step, is logged, and survives a resume."""
    kw = dict(per_device_train_batch_size=4, target_sparsity=0.9, eta_step=3.0, save_strategy="steps", save_steps=2)
    trainer = LTETrainer(model=lte_model(), args=args(tmp_path, max_steps=2, **kw), train_dataset=packed_dataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "eta" in h]
    assert logged[0]["eta"] == pytest.approx(1.0)
    assert logged[1]["eta"] == pytest.approx(1.0 + 3.0 * (0.9 - logged[0]["sparsity"]), rel=1e-4)
    final_eta = trainer.eta
    assert final_eta == pytest.approx(logged[1]["eta"] + 3.0 * (0.9 - logged[1]["sparsity"]), rel=1e-4)
    assert final_eta > 1.0

    resumed = LTETrainer(model=lte_model(), args=args(tmp_path, max_steps=3, **kw), train_dataset=packed_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    step3 = next(h for h in resumed.state.log_history if h.get("step") == 3 and "eta" in h)
    assert step3["eta"] == pytest.approx(final_eta, rel=1e-6)


def test_fixed_eta_without_a_target(tmp_path):
    trainer = LTETrainer(
        model=lte_model(),
        args=args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=packed_dataset(),
    )
    trainer.train()
    assert trainer.eta_controller is None and trainer.eta == 1.0
    assert not any("eta" in h for h in trainer.state.log_history)


def test_hidden_state_distillation(tmp_path):
    """distill_hidden_weight: the mean relative squared error of every layer's output against the original
    model's; zero against an identical copy, and it is the only loss term when everything else is off."""
    teacher, model, trainer, batch = distillation_setup(tmp_path, distill_hidden_weight=2.0)
    task = model(**batch).loss.item()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(task, rel=1e-5)
    with torch.no_grad():
        model.model.layers[1].mlp.base_layer.down_proj.weight.add_(
            torch.randn_like(model.model.layers[1].mlp.base_layer.down_proj.weight)
        )
    loss = trainer.compute_loss(model, batch).item()
    hidden = trainer._metrics["train"]["distill_hidden"][-1].item()
    assert hidden > 1e-3
    assert loss == pytest.approx(model(**batch).loss.item() + 2.0 * hidden, rel=1e-4)
    h = model(**batch, output_hidden_states=True).hidden_states
    h_teacher = teacher(**batch, output_hidden_states=True).hidden_states
    expected = sum(
        ((a - b).square().mean() / b.square().mean()).item() for a, b in zip(h[1:], h_teacher[1:], strict=True)
    ) / (len(h) - 1)
    assert hidden == pytest.approx(expected, rel=1e-4)


def test_the_old_argument_names_still_work_with_a_warning(tmp_path):
    """tau= and lte_mode= (before the renames) give the same arguments as threshold= and lte_routing=."""
    new = args(tmp_path, threshold=0.4, lte_routing="hard")
    with pytest.warns(DeprecationWarning, match=r"\(tau=\.\.\.\) is deprecated, use threshold=") as caught:
        old = args(tmp_path, tau=0.4, lte_mode="hard")
    assert {str(w.message) for w in caught} >= {
        "LTETrainingArguments(tau=...) is deprecated, use threshold=...",
        "LTETrainingArguments(lte_mode=...) is deprecated, use lte_routing=...",
    }
    assert (old.threshold, old.lte_routing) == (new.threshold, new.lte_routing) == (0.4, "hard")
    with pytest.raises(ValueError, match="lte_routing must be one of"):
        args(tmp_path, lte_routing="sparse")
