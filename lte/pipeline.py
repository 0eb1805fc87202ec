"""The LTE run: optional dense fine-tune, prepare, stage 1 (soft routing), stage 2 (hard routing), report.

``prepare`` groups the FFN neurons into experts and initialises the routers, once, in one
process, and writes the result to ``OUTPUT_DIR/prepare/model``; both training stages load a
checkpoint, so nothing is clustered or initialised after a model is sharded (FSDP, ZeRO-3).
Each stage is its own ``Trainer.train()`` with its own trainable set, writing checkpoints to
``OUTPUT_DIR/stageN/checkpoint-*`` and its finished model to ``OUTPUT_DIR/stageN/model``
(written to a temporary directory and renamed, so a finished stage is never half-written).
Rerunning the same command skips finished stages and resumes an unfinished one from its
last intact checkpoint (:func:`last_complete_checkpoint` verifies it). ``OUTPUT_DIR/recipe.yaml``
is the run's record (:mod:`lte.core.record`): a rerun whose settings would no longer match what a
finished stage was trained with stops before any work. A lock (:func:`lte.core.outputs.run_lock`)
keeps a second process out of the same ``output_dir``.
``reuse_from=RUN`` starts a run from another run's finished ``stage0/`` and
``prepare/`` (hard links) when both recipes agree on what those stages read, so runs trained for
different sparsities share them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import get_last_checkpoint, set_seed

from .core import run_dir
from .core.errors import UsageError
from .core.faults import fault_point, step_callback
from .core.outputs import check_apart, check_out, clean_stale, disk_guard, read_marker, remove_dir, run_lock, staged_dir
from .core.record import (
    TRAINED,
    flatten,
    heldout_settings,
    plan_rerun,
    read_record,
    resolve_paths,
    split_sources,
    stage_status,
    stages_of,
    write_record,
)
from .model.experts import moe_router_parameters
from .model.inject import (
    LTEModelConfig,
    check_expert_size,
    inject_lte,
    is_lte_checkpoint,
    load_lte,
    lte_layers,
    save_lte,
    set_lte_routing,
)
from .model.layers import ROUTER_PREFIX
from .model.router_init import init_routers
from .training.adapters import add_lora, check_lora, merge_adapter, quantization_config
from .training.config import ROUTING_OF_STAGE, Recipe, load_run_recipe
from .training.data import LMData, build_data, check_source
from .training.distributed import (
    broadcast_object,
    check_routers_identical,
    describe_parallelism,
    every_rank_loads,
    is_sharded,
    no_zero3_init,
    register_zero3_leaves,
)
from .training.evaluate import EvalResult, evaluate_lm
from .training.loading import (
    DTYPES,
    calibration_batches,
    collator_for,
    layout_report,
    layout_results,
    layout_summary,
    load_tokenizer,
    model_kwargs,
)
from .training.preflight import check_attn_implementation, check_model
from .training.trainer import LTETrainer, TrainingDiverged

logger = logging.getLogger("lte")


def preflight(recipe: Recipe) -> None:
    """Check every input and output of the run before any model or data loads or anything is
    written: data and calibration files, the output directory, the reporting integrations, the
    model (config, weights, tokenizer, attention implementation, FFN layout). The recipe's own
    values (``train.*`` included: each stage's ``TrainingArguments`` is built) are checked by
    :func:`lte.training.config.build_recipe`; whatever this misses fails before the first write in :func:`run`."""
    check_source(recipe.data.train, "data.train")
    if recipe.data.eval:
        check_source(recipe.data.eval, "data.eval")
    if recipe.export.enabled and recipe.export.calibration:
        check_source(recipe.export.calibration, "export.calibration")
    check_output_dir(recipe.output_dir, "output_dir")  # export.out: preflight_outputs (check_out)
    check_report_to(recipe)
    config = check_model(
        recipe.model.name_or_path, "model.name_or_path", recipe.model.trust_remote_code, recipe.model.revision
    )
    skeleton = model_skeleton(recipe, config)
    check_expert_size(skeleton, recipe.lte.expert_size, recipe.model.ffn_layout)
    check_lora(skeleton, recipe.lora, recipe.lte.train_moe_router)


def check_output_dir(path: str, key: str) -> None:
    """``path`` is, or can be made as, a directory this process can write into."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{key}={path} is an existing file, not a directory; choose another {key}")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{key}={path}: {existing} is a file, so no directory can be made under it; choose another {key}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"{key}={path}: {existing} is not writable; set {key} to a directory you can write to "
            f"(or fix the permissions of {existing})"
        )


def check_report_to(recipe: Recipe) -> None:
    """Every ``train.report_to`` integration is installed (the Trainer would fail at its start)."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    for stage in ("stage0", "stage1", "stage2"):
        missing = [r for r in recipe.stage_args(stage, use_cpu=True).report_to or [] if r not in available]
        if missing:
            raise UsageError(
                f"train.report_to: {', '.join(missing)} is not installed here; install it (pip install "
                f"{' '.join(missing)}) or set train.report_to=[{','.join(available)}] ([] reports nowhere)"
            )


def model_skeleton(recipe: Recipe, config):
    """The architecture on the meta device (no weights, milliseconds); an explicit attention
    implementation it does not support fails here, naming the ones it does."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    check_attn_implementation(type(skeleton), recipe.model.attn_implementation)
    return skeleton


def _save_atomically(save, final: Path) -> None:
    """Write a stage's model to a temporary sibling and rename it into place; its marker carries a
    fresh id, by which the export stage knows which model it was made from."""
    stage = final.parent.name
    with staged_dir(final, "train", meta={"stage": stage, "id": uuid.uuid4().hex}, overwrite=True) as tmp:
        save(tmp)
        fault_point(f"{stage}:model")


def prepare_experts(recipe: Recipe, source: str | Path, data: LMData, tokenizer) -> Path:
    """Group neurons into experts and initialise the routers; write ``OUTPUT_DIR/prepare/model``.

    Runs on the main process only, on the whole model (never a shard), while the other
    processes wait; they then read the result from disk. Skipped when already written.
    """
    final = run_dir.stage_model(recipe.output_dir, "prepare")
    state = PartialState()
    if (final / "config.json").is_file():
        logger.info("prepare: experts and routers found at %s, skipping", final)
    elif state.is_main_process:
        with no_zero3_init():
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs(recipe)).to(state.device)
        lte = recipe.lte
        inject_lte(
            model,
            LTEModelConfig.of(lte),
            kmeans_iters=lte.kmeans_iters,
            seed=recipe.seed,
            recipe_layout=recipe.model.ffn_layout,
        )
        agreement = init_routers(
            model,
            lte,
            lambda: calibration_batches(
                data, tokenizer, lte.router_init_tokens, recipe.train.get("per_device_train_batch_size", 8)
            ),
        )
        if agreement:  # None, or empty when every layer is routed experts (centroid init)
            logger.info(
                "prepare: routers fitted to expert importance (label agreement per layer: %s)",
                " ".join(f"{a:.2f}" for a in agreement),
            )
        _save_atomically(lambda d: save_lte(model, d, tokenizer), final)
        logger.info(
            "prepare: %d FFNs grouped into experts of %d neurons, written to %s",
            len(lte_layers(model)),
            lte.expert_size,
            final,
        )
    state.wait_for_everyone()
    return final


def build_stage_model(stage: str, recipe: Recipe, source: str | Path, args):
    """The model a stage starts from, with the stage's routing and trainable set
    (with ``lora.r > 0``: a ``PeftModel`` whose adapters and, in stage 1, routers train)."""
    kwargs = model_kwargs(recipe)
    if stage == "stage0":
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    quantization = quantization_config(
        recipe.lora, DTYPES[recipe.model.dtype] if recipe.model.dtype != "auto" else torch.bfloat16
    )
    model = load_lte(source, **kwargs, **({"quantization_config": quantization} if quantization else {}))
    set_lte_routing(model, ROUTING_OF_STAGE[stage])
    for name, param in model.named_parameters():
        if ROUTER_PREFIX in name:
            param.requires_grad_(stage == "stage1")
    for _, param in moe_router_parameters(model):  # the model's own MoE routers
        param.requires_grad_(recipe.lte.train_moe_router)
    register_zero3_leaves(model)
    if recipe.lora.enabled:
        model = add_lora(
            model,
            recipe.lora,
            train_routers=stage == "stage1",
            gradient_checkpointing=args.gradient_checkpointing,
            train_moe_router=recipe.lte.train_moe_router,
        )
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        logger.info(
            "%s: model loaded partitioned by ZeRO-3 (%d of %d weights stored on this process)",
            stage,
            sum(p.ds_tensor.numel() for p in partitioned),
            sum(p.ds_numel for p in partitioned),
        )
    return model


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (which file, what is wrong), or None.

    Cheap checks that catch what a kill or a full disk leaves: ``trainer_state.json`` parses,
    every file is non-empty, every safetensors file holds the bytes its header promises, and
    every torch file (optimizer, scheduler, RNG state) is a readable zip archive (torch's format
    keeps its index at the end, so a truncated file fails to open).
    """
    path = Path(checkpoint)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "trainer_state.json is missing (the run stopped while writing the checkpoint)"
    try:
        if "global_step" not in json.loads(state_file.read_text()):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not parse ({exc})"
    sharded = any(p.is_dir() for p in path.iterdir())  # FSDP's pytorch_model_fsdp_*/, ZeRO's global_step*/
    if (
        not sharded
        and not any(path.glob("*.safetensors"))
        and not any(path.glob("pytorch_model*.bin"))
        and not (path / "adapter_model.bin").is_file()
    ):
        return "it holds no model weights"
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        size = file.stat().st_size
        if size == 0:
            return f"{file.name} is empty"
        if file.suffix == ".safetensors":
            try:
                with open(file, "rb") as handle:
                    length = int.from_bytes(handle.read(8), "little")
                    if length <= 0 or 8 + length > size:
                        return f"{file.name} is truncated (its header runs past the end of the file)"
                    header = json.loads(handle.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return f"{file.name} has an unreadable header ({exc})"
            if 8 + length + end > size:
                return f"{file.name} is truncated ({size} bytes, its header needs {8 + length + end})"
        elif file.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
            except (OSError, zipfile.BadZipFile) as exc:
                return f"{file.name} is damaged or truncated ({exc})"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that can be resumed from, or None.

    The Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed
    while saving leaves a directory without it; a full disk can leave empty or truncated files.
    Each checkpoint that fails :func:`checkpoint_problem` is logged with the file at fault and
    removed (it would be resumed from, or written into, otherwise), and the one before it is
    tried; the Trainer only rotates old checkpoints out after a new one is complete.
    """
    if not os.path.isdir(output_dir):
        return None
    clean_stale(output_dir)
    damaged = False
    while (last := get_last_checkpoint(output_dir)) is not None:
        problem = checkpoint_problem(last)
        if problem is None:
            if damaged:
                logger.warning("resuming from %s, the newest intact checkpoint", last)
            return last
        logger.warning("checkpoint %s cannot be resumed from: %s; removing it and trying the one before", last, problem)
        remove_dir(Path(last))
        damaged = True
    if damaged:
        logger.warning("%s: no intact checkpoint left; the stage restarts from its beginning", output_dir)
    return None


def run_stage(stage: str, recipe: Recipe, source: str | Path, data: LMData, tokenizer, teacher_source=None) -> Path:
    """Train one stage (or resume it) and return the directory of its finished model."""
    args = recipe.stage_args(stage)
    final = run_dir.stage_model(recipe.output_dir, stage)
    state = PartialState()
    if (final / "config.json").is_file():
        logger.info("%s: finished model found at %s, skipping", stage, final)
        return final
    if args.max_steps == 0:  # nothing to train: the stage's model is its starting checkpoint
        if state.is_main_process:
            _save_atomically(lambda d: shutil.copytree(source, d, dirs_exist_ok=True), final)
        state.wait_for_everyone()
        return final
    model = build_stage_model(stage, recipe, source, args)
    teacher = None
    if args.distills:
        with every_rank_loads():
            teacher = AutoModelForCausalLM.from_pretrained(teacher_source, **model_kwargs(recipe))
    trainer = LTETrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator_for(data, tokenizer),
        processing_class=tokenizer,
        teacher=teacher,
    )
    if (fault := step_callback(stage)) is not None:
        trainer.add_callback(fault)
    last = last_complete_checkpoint(args.output_dir) if state.is_main_process else None
    last = broadcast_object(last)
    if last:
        logger.info("%s: resuming from %s", stage, last)
    logger.info(
        "%s: training %d steps with %s routing on %d process(es) (%s)",
        stage,
        args.max_steps,
        args.lte_routing,
        state.num_processes,
        describe_parallelism(trainer.accelerator),
    )
    try:
        trainer.train(resume_from_checkpoint=last)
    except TrainingDiverged as exc:
        raise TrainingDiverged(divergence_message(recipe, stage, exc), step=exc.step, loss=exc.loss) from None
    run_dir.diverged_file(recipe.output_dir, stage).unlink(missing_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_routers_identical(model, stage)
    if recipe.lora.enabled:
        _save_merged(stage, recipe, source, trainer, tokenizer, final)
        return final
    # Sharded parameters (FSDP, ZeRO-3) are gathered into one state dict: a collective, every rank
    # takes part. Replicated ones (DDP, ZeRO-2) are saved from rank 0's own copy.
    full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if is_sharded(trainer.accelerator) else None
    if state.is_main_process:
        save = (
            (lambda d: save_lte(model, d, tokenizer, full_state))
            if lte_layers(model)
            else (lambda d: (model.save_pretrained(d, state_dict=full_state), tokenizer.save_pretrained(d)))
        )
        _save_atomically(save, final)
    state.wait_for_everyone()
    return final


def learning_rate_key(recipe: Recipe, stage: str) -> str:
    """The recipe key that sets ``stage``'s learning rate without touching an earlier trained stage:
    ``train.STAGE.learning_rate`` when the stage sets its own or an earlier stage trains, else
    ``train.learning_rate``."""
    own = "learning_rate" in (recipe.train.get(stage) or {})
    earlier = [s for s in ("stage0", "stage1") if s < stage and getattr(recipe.lte, f"{s}_steps") > 0]
    return f"train.{stage}.learning_rate" if own or earlier else "train.learning_rate"


def divergence_message(recipe: Recipe, stage: str, exc: TrainingDiverged) -> str:
    """The divergence message, with the exact key and what a rerun will do; also leaves
    ``STAGE/diverged.json``, by which the rerun with a changed rate restarts the stage."""
    key = learning_rate_key(recipe, stage)
    rate = recipe.stage_args(stage, use_cpu=True, bf16=False, fp16=False).learning_rate
    diverged = run_dir.diverged_file(recipe.output_dir, stage)
    if PartialState().is_main_process:
        diverged.parent.mkdir(parents=True, exist_ok=True)
        diverged.write_text(
            json.dumps({"step": exc.step, "loss": str(exc.loss), "key": key, "learning_rate": rate}) + "\n"
        )
    return (
        f"{stage} diverged: the loss became {exc.loss} at step {exc.step}; nothing from that step was saved. "
        f"Lower {key} (now {rate:g}), for example add {key}={rate / 10:g} to the same command, and rerun it: "
        f"{stage} then restarts from its beginning with the new rate (its checkpoints carry the old rate in their "
        f"optimizer and scheduler state), and the stages before it are kept"
    )


def _save_merged(stage: str, recipe: Recipe, source: str | Path, trainer, tokenizer, final: Path) -> None:
    """LoRA stages: save the adapter (every rank takes part), then merge it on the main process
    into an unquantized copy of the stage's starting model and save that as the stage model."""
    state = PartialState()
    adapter = run_dir.adapter_dir(recipe.output_dir, stage)
    trainer.save_model(str(adapter))
    if state.is_main_process:
        with no_zero3_init():
            merged = merge_adapter(source, adapter, **model_kwargs(recipe))
        _save_atomically(lambda d: save_lte(merged, d, tokenizer), final)
        logger.info("%s: adapter %s merged into %s", stage, adapter, final)
    state.wait_for_everyone()


def evaluate_run(recipe: Recipe, data: LMData, tokenizer, stage2: Path) -> dict[str, EvalResult]:
    """Held-out perplexity of the original model, of the dense fine-tuned model when stage 0 ran (the
    fair reference for what the sparsity costs), and of the trained sparse model (hard routing); with
    text data, also of each on every held-out layout (``NAME/LAYOUT`` keys: ``sparse/eos``...)."""
    device = PartialState().device
    collator = collator_for(data, tokenizer)
    batch = recipe.train.get("per_device_eval_batch_size", 8)
    dense_models = {"dense": (recipe.model.name_or_path, "the original model")}
    if recipe.lte.stage0_steps > 0:
        dense_models["stage0"] = (
            run_dir.stage_model(recipe.output_dir, "stage0"),
            "the stage-0 (dense fine-tuned) model",
        )
    results = {}
    for name, (source, what) in dense_models.items():
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs(recipe)).to(device)
        results[name] = evaluate_lm(model, data.eval, collator, batch, desc=f"Evaluating {what}")
        results |= layout_results(name, model, data, tokenizer, batch)
        del model
    sparse_model = load_lte(stage2, **model_kwargs(recipe)).to(device)
    results["sparse"] = evaluate_lm(sparse_model, data.eval, collator, batch, desc="Evaluating the sparse model")
    results |= layout_results("sparse", sparse_model, data, tokenizer, batch)
    return results


def plot_per_layer(per_layer: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(per_layer) + 2), 3.2))
    ax.bar(range(len(per_layer)), [100 * s for s in per_layer], color="tab:blue")
    ax.axhline(100 * sum(per_layer) / len(per_layer), color="tab:red", linestyle="--", label="mean")
    ax.set(xlabel="layer", ylabel="FFN neurons skipped (%)", ylim=(0, 100))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_report(report: dict, out: Path) -> None:
    """Write ``OUTPUT_DIR/report.json`` through a temporary file, so it is never half-written."""
    path = run_dir.report_file(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def write_report(recipe: Recipe, results: dict[str, EvalResult], stage2: Path) -> dict:
    out = Path(recipe.output_dir)
    dense, sparse, stage0 = results["dense"], results["sparse"], results.get("stage0")
    report = {
        "dense_ppl": dense.ppl,
        "sparse_ppl": sparse.ppl,
        "ppl_increase": sparse.ppl / dense.ppl - 1,
        "stage0_ppl": stage0.ppl if stage0 else None,
        "ppl_increase_vs_stage0": sparse.ppl / stage0.ppl - 1 if stage0 else None,
        "sparsity": sparse.sparsity,
        "per_layer_sparsity": sparse.per_layer_sparsity,
        "eval_tokens": sparse.tokens,
        "layouts": layout_report(results),
        "model_dir": os.path.relpath(stage2, out),
        "export_dir": None,
        "recipe": recipe.to_dict(),
    }
    save_report(report, out)
    reference = f"stage 0 {stage0.ppl:.3f}" if stage0 else f"dense {dense.ppl:.3f}"
    plot_per_layer(
        sparse.per_layer_sparsity,
        run_dir.plot_file(out),
        f"{recipe.name}: FFN sparsity {100 * sparse.sparsity:.1f}%, held-out ppl {sparse.ppl:.3f} ({reference})",
    )
    return report


def summary(report: dict, out: Path) -> str:
    per_layer = " ".join(f"{100 * s:.0f}%" for s in report["per_layer_sparsity"])
    lines = [
        f"\nLTE run finished: {out}",
        (
            f"  held-out perplexity  dense {report['dense_ppl']:.4f} -> sparse {report['sparse_ppl']:.4f} "
            f"({100 * report['ppl_increase']:+.2f}%)"
        ),
    ]
    if report.get("stage0_ppl"):
        lines.append(
            f"                       stage 0 (dense fine-tuned) {report['stage0_ppl']:.4f} -> sparse "
            f"({100 * report['ppl_increase_vs_stage0']:+.2f}%)"
        )
    if report.get("layouts"):
        lines += [
            f"  held-out layouts     sparse: {layout_summary(report['layouts'])}",
            f"                       dense:  {layout_summary(report['layouts'], 'dense')}",
        ]
    lines += [
        f"  FFN sparsity         {100 * report['sparsity']:.1f}% of neurons skipped per token (per layer: {per_layer})",
        f"  sparse model         {out / report['model_dir']}",
        f"  report               {run_dir.report_file(out)}, {run_dir.plot_file(out)}\n",
    ]
    return "\n".join(lines)


def shared_stage_settings(recipe: Recipe) -> dict:
    """The settings stage 0 (when it has steps) and the prepare step depend on, as dotted keys (from
    :data:`lte.core.record.KEY_STAGES`): two runs that agree on them produce the same ``stage0/`` and ``prepare/``."""
    stages = {"prepare"} | ({"stage0"} if recipe.lte.stage0_steps > 0 else set())
    return {key: value for key, value in flatten(recipe.to_dict()).items() if stages_of(key) & stages}


def reused_stages(recipe: Recipe) -> list[tuple[Path, Path]]:
    """``reuse_from``: the (finished stage model there, stage model here) pairs this run takes from that
    run, stage 0 (when it has steps) and prepare. Checks, before anything is written, that the run
    exists, that those stages finished there, and that its recipe agrees on what they depend on."""
    if not recipe.reuse_from:
        return []
    source, key = Path(recipe.reuse_from), f"reuse_from={recipe.reuse_from}"
    if not run_dir.recipe_file(source).is_file():
        raise UsageError(
            f"{key}: no `lte train` run there (no recipe.yaml); give the output_dir of a run whose "
            f"stage 0 and prepare step have finished, or drop reuse_from"
        )
    recipe = resolve_paths(recipe)  # the record stores absolute paths; compare like with like
    source = Path(recipe.reuse_from)
    if all(
        run_dir.is_finished(recipe.output_dir, stage)
        for stage in (["stage0"] if recipe.lte.stage0_steps > 0 else []) + ["prepare"]
    ):
        return []  # linked by an earlier run of this command
    theirs, ours = shared_stage_settings(resolve_paths(load_run_recipe(source))), shared_stage_settings(recipe)
    differ = [k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    if differ:
        listed = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:6])
        raise UsageError(
            f"{key}: that run's stage 0 and prepare step were made with other settings ({listed}"
            f"{'; ...' if len(differ) > 6 else ''}); set them as that run did, or drop reuse_from"
        )
    pairs = []
    for stage in (["stage0"] if recipe.lte.stage0_steps > 0 else []) + ["prepare"]:
        there = run_dir.stage_model(source, stage)
        if not run_dir.is_finished(source, stage):
            raise UsageError(
                f"{key}: {there} is not finished; finish that run first (rerun its command) or drop reuse_from"
            )
        pairs.append((there, run_dir.stage_model(recipe.output_dir, stage)))
    return pairs


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link (no extra disk; stage models are replaced, never written in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def link_stages(pairs: list[tuple[Path, Path]]) -> None:
    """Put each reused stage model in place (skipping those already there: a rerun)."""
    for there, here in pairs:
        if (here / "config.json").is_file():
            continue
        here.parent.mkdir(parents=True, exist_ok=True)
        _save_atomically(
            lambda d, there=there: shutil.copytree(there, d, copy_function=_link_or_copy, dirs_exist_ok=True), here
        )
        logger.info("%s: reused %s", here.parent.name, there)


def preflight_outputs(recipe: Recipe) -> None:
    """Where the run writes: ``output_dir`` apart from its inputs and writable, and the export's
    directory free or this run's own (checked before any work)."""
    out = Path(recipe.output_dir)
    inputs = {
        "model.name_or_path": recipe.model.name_or_path,
        **{f"data.train ({p})": p for p in split_sources(recipe.data.train)},
        **{f"data.eval ({p})": p for p in split_sources(recipe.data.eval)},
    }
    check_apart(out, f"output_dir={out}", inputs)  # a file there, or no write access: preflight's check_output_dir
    if recipe.export.enabled:
        target = export_target(recipe)
        check_out(
            target,
            "export",
            flag="export.out",
            inputs={
                **{f"export.calibration ({p})": p for p in split_sources(recipe.export.calibration)},
                **inputs,
            },
            runs={"this run's output_dir": out},
            overwrite=is_own_export(recipe, target),
            overwrite_hint="it is not this run's export, so the export stage will not replace it; remove it yourself",
        )


def open_record(recipe: Recipe, restart_from: str | None) -> None:
    """Compare the recipe with the run's record and act on the difference (see :mod:`lte.core.record`)."""
    out = Path(recipe.output_dir)
    for directory in (out, *(run_dir.stage_dir(out, s) for s in TRAINED)):
        clean_stale(directory)
    new = recipe.to_dict()
    plan = plan_rerun(read_record(out), new, stage_status(out), restart_from)
    if plan.changed:
        logger.info("recipe changed since the last run in %s: %s", out, plan.describe())
    for stage in plan.discard:
        logger.warning(
            "%s: discarding %s/ (%s), which the new settings replace",
            stage,
            run_dir.stage_dir(out, stage),
            "it diverged" if run_dir.diverged_file(out, stage).is_file() else f"restart_from={restart_from}",
        )
        remove_dir(run_dir.stage_dir(out, stage))
    if plan.discard:  # the report described the discarded models
        run_dir.report_file(out).unlink(missing_ok=True)
    if plan.update_record:
        write_record(out, new)


@contextlib.contextmanager
def claimed(recipe: Recipe, restart_from: str | None = None):
    """Hold the run's lock and settle its record (main process), before any work."""
    state = PartialState()
    out = Path(recipe.output_dir)
    with contextlib.ExitStack() as stack:
        problem, failure = None, None
        if state.is_main_process:
            try:
                stack.enter_context(run_lock(out))
                open_record(recipe, restart_from)
            except UsageError as exc:
                problem = str(exc)
            except Exception as exc:  # told to the other ranks too, or they would wait for the broadcast forever
                problem, failure = f"the main process could not open the run: {type(exc).__name__}: {exc}", exc
        problem = broadcast_object(problem)
        if failure is not None:
            raise failure
        if problem:
            raise UsageError(problem)
        state.wait_for_everyone()
        yield


def run(recipe: Recipe, restart_from: str | None = None) -> dict | None:
    """Run every stage of ``recipe`` (resuming what is already done); returns the report.

    ``restart_from``: a trained stage to discard, with every stage after it, before running.
    """
    preflight(recipe)  # its messages name the paths as the user wrote them
    recipe = resolve_paths(recipe)
    preflight_outputs(recipe)
    reused = reused_stages(recipe)
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)  # bad data fails here, before anything is written
    check_export_calibration(recipe, tokenizer, data)
    out = Path(recipe.output_dir)
    with (
        claimed(recipe, restart_from),
        disk_guard(out, "then rerun the same command: it resumes from the last checkpoint"),
    ):
        return _run_stages(recipe, reused, tokenizer, data)


def _run_stages(recipe: Recipe, reused: list[tuple[Path, Path]], tokenizer, data: LMData) -> dict | None:
    state = PartialState()
    out = Path(recipe.output_dir)
    if state.is_main_process:
        link_stages(reused)
    state.wait_for_everyone()
    logger.info("data: %d training and %d held-out examples", len(data.train), len(data.eval))

    source: str | Path = recipe.model.name_or_path
    if recipe.lte.stage0_steps > 0:
        source = run_stage("stage0", recipe, source, data, tokenizer)
    prepared = prepare_experts(recipe, source, data, tokenizer)
    stage1 = run_stage("stage1", recipe, prepared, data, tokenizer, teacher_source=source)
    stage2 = run_stage("stage2", recipe, stage1, data, tokenizer, teacher_source=source)
    if not is_lte_checkpoint(stage2):
        raise UsageError(f"{stage2} is not an LTE checkpoint; delete {out} and rerun")
    if not state.is_main_process:
        return None
    with no_zero3_init():  # one process from here on: load models whole
        report = write_report(recipe, evaluate_run(recipe, data, tokenizer, stage2), stage2)
        print(summary(report, out), flush=True)
        if recipe.export.enabled:
            report = run_export(recipe, report)
    return report


def check_export_calibration(recipe: Recipe, tokenizer, data: LMData) -> None:
    """The export stage's calibration text holds ``export.calibration_tokens``: checked with the data,
    before training, not after both stages."""
    if not recipe.export.enabled:
        return
    from .export.exporter import ExportRequest, calibration_data

    request = ExportRequest.of_recipe(recipe)
    calibration_data(request, recipe, tokenizer, data, keys=("export.calibration", "export.calibration_tokens"))


def export_target(recipe: Recipe) -> Path:
    return Path(recipe.export.out or run_dir.default_export(recipe.output_dir))


def is_own_export(recipe: Recipe, target: Path) -> bool:
    """Whether ``target`` is this run's export, which its export stage may replace: written by
    ``lte export`` (its marker) and lying inside the run (a run moved or copied keeps its export),
    or naming this run or its stage-2 model."""
    marker = read_marker(target) or {}
    out = Path(recipe.output_dir)
    if not marker and run_dir.export_report_file(target).is_file():  # written before exports carried a marker
        return json.loads(run_dir.export_report_file(target).read_text()).get("source_run") == str(out)
    if marker.get("command") != "export":
        return False
    stage2_id = (read_marker(run_dir.stage_model(out, "stage2")) or {}).get("id")
    return (
        target.resolve().is_relative_to(out)
        or marker.get("source_run") == str(out)
        or (stage2_id is not None and marker.get("stage2_id") == stage2_id)
    )


def run_export(recipe: Recipe, report: dict) -> dict:
    """The export stage: ``lte export`` with the recipe's ``export.*``. Skipped when the export there
    was made by this run, from this stage-2 model, with these settings (its marker says so);
    otherwise (re)made, replacing only this run's own earlier export."""
    from .export.exporter import ExportRequest, export, summary as export_summary

    out = Path(recipe.output_dir)
    target = export_target(recipe)
    request = ExportRequest.of_recipe(recipe, run_dir=str(out), out=str(target))
    marker = read_marker(target) or {}
    ours = is_own_export(recipe, target)
    current = (read_marker(run_dir.stage_model(out, "stage2")) or {}).get("id")
    settings = {**request.settings(), **heldout_settings(recipe.to_dict())}
    if (
        ours
        and marker.get("settings") == settings
        and marker.get("stage2_id") == current
        and run_dir.export_report_file(target).is_file()
    ):
        logger.info("export: finished export found at %s, skipping", target)
        exported = json.loads(run_dir.export_report_file(target).read_text())
    else:
        request.overwrite = ours
        exported = export(request)
        print(export_summary(exported, target), flush=True)
    report["export_dir"] = os.path.relpath(target, out)
    report["export"] = {
        k: exported.get(k)
        for k in (
            "target_sparsity",
            "heldout_sparsity",
            "per_layer_sparsity",
            "sparsity_by_kind",
            "ffn_bytes_per_token",
            "sparse_ppl",
            "dense_ppl",
            "allocation",
            "layouts",
        )
    }
    save_report(report, out)
    return report
