"""The LTE run: optional dense fine-tune, prepare, stage 1 (soft routing), stage 2 (hard routing), report.

``prepare`` groups the FFN neurons into experts and initialises the routers, once, in one
process, and writes the result to ``OUTPUT_DIR/prepare/model``; both training stages load a
checkpoint, so nothing is clustered or initialised after a model is sharded (FSDP, ZeRO-3).
Each stage is its own ``Trainer.train()`` with its own trainable set, writing checkpoints to
``OUTPUT_DIR/stageN/checkpoint-*`` and its finished model to ``OUTPUT_DIR/stageN/model``
(written to a temporary directory and renamed, so a finished stage is never half-written).
Rerunning the same command skips finished stages and resumes an unfinished one from its
last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator
from transformers.trainer_utils import get_last_checkpoint, set_seed

from .adapters import add_lora, merge_adapter, quantization_config
from .config import Recipe
from .data import LMData, build_data, check_source
from .errors import UsageError
from .evaluate import EvalResult, evaluate_layouts, evaluate_lm
from .inject import LTEModelConfig, check_expert_size, inject_lte, is_lte_checkpoint, load_lte, lte_layers, save_lte, set_lte_mode
from .distributed import (broadcast_object, check_routers_identical, describe_parallelism, every_rank_loads, is_sharded,
                          no_zero3_init, register_zero3_leaves)
from .layers import ROUTER_PREFIX
from .router_init import calibrate_routers
from .trainer import LTETrainer

logger = logging.getLogger("lte")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
STAGE_MODEL = "model"
REPORT = "report.json"


def model_kwargs(recipe: Recipe) -> dict:
    kwargs = {"dtype": DTYPES[recipe.model.dtype], "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def preflight(recipe: Recipe) -> None:
    """Check the model and data exist before anything is written."""
    check_source(recipe.data.train, "data.train")
    if recipe.data.eval:
        check_source(recipe.data.eval, "data.eval")
    source = recipe.model.name_or_path
    local = Path(source).expanduser()
    if (source.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise UsageError(f"model.name_or_path={source}: no model there (expected a directory with config.json)")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code,
                                            revision=recipe.model.revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model.name_or_path={source!r}: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):  # the architecture without weights: checks the FFNs in milliseconds
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    check_expert_size(skeleton, recipe.lte.expert_size)


def load_tokenizer(recipe: Recipe):
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code,
                                              revision=recipe.model.revision)
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and the router statistics, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def collator_for(data: LMData, tokenizer):
    if data.padded:  # instruction data: TRL's collator pads input_ids and labels (with -100) per batch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    return default_data_collator


def _save_atomically(save, final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def calibration_batches(data: LMData, tokenizer, tokens: int, batch_size: int) -> list[dict]:
    """The first ``tokens`` training tokens, batched: calibration data for the router init."""
    rows, total = [], 0
    for row in data.train:
        if total >= tokens:
            break
        rows.append(row)
        total += len(row["input_ids"])
    collate = collator_for(data, tokenizer)
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def prepare_experts(recipe: Recipe, source: str | Path, data: LMData, tokenizer) -> Path:
    """Group neurons into experts and initialise the routers; write ``OUTPUT_DIR/prepare/model``.

    Runs on the main process only, on the whole model (never a shard), while the other
    processes wait; they then read the result from disk. Skipped when already written.
    """
    final = Path(recipe.output_dir) / "prepare" / STAGE_MODEL
    state = PartialState()
    if (final / "config.json").is_file():
        logger.info("prepare: experts and routers found at %s, skipping", final)
    elif state.is_main_process:
        with no_zero3_init():
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs(recipe)).to(state.device)
        lte = recipe.lte
        inject_lte(model, LTEModelConfig(expert_size=lte.expert_size, tau=lte.tau, router_bias=lte.router_bias,
                                         router_init=lte.router_init, router_init_scale=lte.router_init_scale,
                                         detach_router_input=lte.detach_router_input),
                   kmeans_iters=lte.kmeans_iters, seed=recipe.seed)
        if lte.router_init == "calibrated":
            batches = calibration_batches(data, tokenizer, lte.router_init_tokens,
                                          recipe.train.get("per_device_train_batch_size", 8))
            agreement = calibrate_routers(model, batches, lte.router_init_sparsity, lte.router_init_steps)
            logger.info("prepare: routers fitted to expert importance (label agreement per layer: %s)",
                        " ".join(f"{a:.2f}" for a in agreement))
        _save_atomically(lambda d: save_lte(model, d, tokenizer), final)
        logger.info("prepare: %d FFNs grouped into experts of %d neurons, written to %s",
                    len(lte_layers(model)), lte.expert_size, final)
    state.wait_for_everyone()
    return final


def build_stage_model(stage: str, recipe: Recipe, source: str | Path, args):
    """The model a stage starts from, with the stage's routing mode and trainable set
    (with ``lora.r > 0``: a ``PeftModel`` whose adapters and, in stage 1, routers train)."""
    kwargs = model_kwargs(recipe)
    if stage == "stage0":
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    quantization = quantization_config(recipe.lora, DTYPES[recipe.model.dtype] if recipe.model.dtype != "auto" else torch.bfloat16)
    model = load_lte(source, **kwargs, **({"quantization_config": quantization} if quantization else {}))
    set_lte_mode(model, "soft" if stage == "stage1" else "hard")
    for name, param in model.named_parameters():
        if ROUTER_PREFIX in name:
            param.requires_grad_(stage == "stage1")
    register_zero3_leaves(model)
    if recipe.lora.enabled:
        model = add_lora(model, recipe.lora, train_routers=stage == "stage1",
                         gradient_checkpointing=args.gradient_checkpointing)
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        logger.info("%s: model loaded partitioned by ZeRO-3 (%d of %d weights stored on this process)", stage,
                    sum(p.ds_tensor.numel() for p in partitioned), sum(p.ds_numel for p in partitioned))
    return model


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint the Trainer finished writing, or None.

    The Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed
    while saving leaves a directory without it; resuming from that would load a partial state.
    Such directories are removed (a finished older checkpoint is still there: the Trainer only
    rotates old checkpoints out after the new one is complete).
    """
    if not os.path.isdir(output_dir):
        return None
    while (last := get_last_checkpoint(output_dir)) is not None:
        if (Path(last) / "trainer_state.json").is_file():
            return last
        logger.warning("removing %s: the run stopped while writing it", last)
        shutil.rmtree(last)
    return None


def run_stage(stage: str, recipe: Recipe, source: str | Path, data: LMData, tokenizer, teacher_source=None) -> Path:
    """Train one stage (or resume it) and return the directory of its finished model."""
    args = recipe.stage_args(stage)
    final = Path(args.output_dir) / STAGE_MODEL
    state = PartialState()
    if (final / "config.json").is_file():
        logger.info("%s: finished model found at %s, skipping", stage, final)
        return final
    if args.max_steps == 0:  # nothing to train: the stage's model is its starting checkpoint
        if state.is_main_process:
            _save_atomically(lambda d: shutil.copytree(source, d), final)
        state.wait_for_everyone()
        return final
    model = build_stage_model(stage, recipe, source, args)
    teacher = None
    if args.distills:
        with every_rank_loads():
            teacher = AutoModelForCausalLM.from_pretrained(teacher_source, **model_kwargs(recipe))
    trainer = LTETrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         data_collator=collator_for(data, tokenizer), processing_class=tokenizer, teacher=teacher)
    last = last_complete_checkpoint(args.output_dir) if state.is_main_process else None
    last = broadcast_object(last)
    if last:
        logger.info("%s: resuming from %s", stage, last)
    logger.info("%s: training %d steps in %s mode on %d process(es) (%s)", stage, args.max_steps, args.lte_mode,
                state.num_processes, describe_parallelism(trainer.accelerator))
    trainer.train(resume_from_checkpoint=last)
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_routers_identical(model, stage)
    if recipe.lora.enabled:
        _save_merged(stage, recipe, source, trainer, tokenizer, final)
        return final
    # Sharded parameters (FSDP, ZeRO-3) are gathered into one state dict: a collective, every rank
    # takes part. Replicated ones (DDP, ZeRO-2) are saved from rank 0's own copy.
    full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if is_sharded(trainer.accelerator) else None
    if state.is_main_process:
        save = (lambda d: save_lte(model, d, tokenizer, full_state)) if lte_layers(model) else (
            lambda d: (model.save_pretrained(d, state_dict=full_state), tokenizer.save_pretrained(d)))
        _save_atomically(save, final)
    state.wait_for_everyone()
    return final


def _save_merged(stage: str, recipe: Recipe, source: str | Path, trainer, tokenizer, final: Path) -> None:
    """LoRA stages: save the adapter (every rank takes part), then merge it on the main process
    into an unquantized copy of the stage's starting model and save that as the stage model."""
    state = PartialState()
    adapter = Path(recipe.output_dir) / stage / "adapter"
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
        dense_models["stage0"] = (Path(recipe.output_dir) / "stage0" / STAGE_MODEL, "the stage-0 (dense fine-tuned) model")
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


def layout_results(name: str, model, data: LMData, tokenizer, batch_size: int) -> dict[str, EvalResult]:
    """``{"NAME/LAYOUT": result}`` for every held-out layout of ``data`` (none for instruction data)."""
    found = evaluate_layouts(model, data.layouts, tokenizer.pad_token_id, batch_size, what=f"({name})")
    return {f"{name}/{layout}": result for layout, result in found.items()}


def layout_report(results: dict[str, EvalResult]) -> dict:
    """``{layout: {"tokens", "<model>_ppl"...}}`` from :func:`evaluate_run`'s ``NAME/LAYOUT`` results."""
    report: dict = {}
    for key, result in results.items():
        if "/" in key:
            name, layout = key.split("/", 1)
            entry = report.setdefault(layout, {"tokens": result.tokens})
            entry[f"{name}_ppl"] = result.ppl
            if result.sparsity is not None:
                entry[f"{name}_sparsity"] = result.sparsity
    return report


def layout_summary(layouts: dict, name: str = "sparse") -> str:
    """One line: ``NAME``'s perplexity per layout, and each against the first (``<s> doc``)."""
    from .data import LAYOUTS

    if not layouts:
        return ""
    base = next(iter(layouts.values()))[f"{name}_ppl"]
    cells = [f"{LAYOUTS.get(k, k)} {v[f'{name}_ppl']:.4f}" + ("" if i == 0 else f" ({100 * (v[f'{name}_ppl'] / base - 1):+.1f}%)")
             for i, (k, v) in enumerate(layouts.items())]
    return ", ".join(cells)


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


def load_report(out: str | os.PathLike) -> dict:
    """``OUTPUT_DIR/report.json``, or ``{}`` for a run without one (copied, or stopped before it)."""
    path = Path(out) / REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def save_report(report: dict, out: Path) -> None:
    """Write ``OUTPUT_DIR/report.json`` through a temporary file, so it is never half-written."""
    tmp = out / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT)


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
    plot_per_layer(sparse.per_layer_sparsity, out / "per_layer_sparsity.png",
                   f"{recipe.name}: FFN sparsity {100 * sparse.sparsity:.1f}%, held-out ppl {sparse.ppl:.3f} ({reference})")
    return report


def summary(report: dict, out: Path) -> str:
    per_layer = " ".join(f"{100 * s:.0f}%" for s in report["per_layer_sparsity"])
    lines = [f"\nLTE run finished: {out}",
             f"  held-out perplexity  dense {report['dense_ppl']:.4f} -> sparse {report['sparse_ppl']:.4f} "
             f"({100 * report['ppl_increase']:+.2f}%)"]
    if report.get("stage0_ppl"):
        lines.append(f"                       stage 0 (dense fine-tuned) {report['stage0_ppl']:.4f} -> sparse "
                     f"({100 * report['ppl_increase_vs_stage0']:+.2f}%)")
    if report.get("layouts"):
        lines += [f"  held-out layouts     sparse: {layout_summary(report['layouts'])}",
                  f"                       dense:  {layout_summary(report['layouts'], 'dense')}"]
    lines += [f"  FFN sparsity         {100 * report['sparsity']:.1f}% of neurons skipped per token (per layer: {per_layer})",
              f"  sparse model         {out / report['model_dir']}",
              f"  report               {out / REPORT}, {out / 'per_layer_sparsity.png'}\n"]
    return "\n".join(lines)


def run(recipe: Recipe) -> dict | None:
    """Run every stage of ``recipe`` (resuming what is already done); returns the report."""
    preflight(recipe)
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    state = PartialState()
    out = Path(recipe.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
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


def run_export(recipe: Recipe, report: dict) -> dict:
    """The export stage: ``lte export`` with the recipe's ``export.*``; skipped when done."""
    from .export import EXPORT_REPORT, ExportRequest, export
    from .export import summary as export_summary

    out = Path(recipe.output_dir)
    target = Path(recipe.export.out or out / "export")
    done = target / EXPORT_REPORT
    stale = done.is_file() and done.stat().st_mtime < (out / "stage2" / STAGE_MODEL / "config.json").stat().st_mtime
    if done.is_file() and not stale:
        logger.info("export: finished export found at %s, skipping", target)
        exported = json.loads(done.read_text())
    else:
        args = recipe.export
        exported = export(ExportRequest(run_dir=str(out), out=str(target), target_sparsity=args.target_sparsity,
                                        max_ppl_increase=args.max_ppl_increase, calibration=args.calibration,
                                        calibration_tokens=args.calibration_tokens, allocation=args.allocation,
                                        overwrite=stale))
        print(export_summary(exported, target), flush=True)
    report["export_dir"] = os.path.relpath(target, out)
    report["export"] = {k: exported.get(k) for k in ("target_sparsity", "heldout_sparsity", "per_layer_sparsity", "sparse_ppl",
                                                     "dense_ppl", "allocation", "layouts")}
    save_report(report, out)
    return report
