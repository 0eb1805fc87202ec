"""``lte export``: a trained run -> a checkpoint at a chosen sparsity that loads anywhere.

1. Load the run's stage-2 model and the calibration tokens (the run's training data, or
   ``--calibration FILE``).
2. Tune per-layer thresholds (:mod:`lte.export.thresholds`) to the target sparsity, or to the
   highest sparsity within a perplexity budget.
3. Make the FFN projections routed (:mod:`lte.export.remote.modeling_lte`), ``save_pretrained`` the
   model (the base model's tensors, names and layouts; the routers in their own file, format 2 of
   :mod:`lte.export.remote.layout`), and add to
   ``config.json`` an ``auto_map`` to the code files copied beside it (``model_type`` stays the
   base model's: plain loaders get the dense base class, ``trust_remote_code=True`` the sparse one).
4. Load the written checkpoint back (``trust_remote_code=True``) and compare its logits with
   the in-memory model; a mismatch fails the export.
5. Measure sparsity and perplexity on the run's held-out data and write ``lte_export.json``
   and two plots.

Everything is written to a temporary directory next to ``--out`` and renamed into place at
the end (:func:`lte.core.outputs.staged_dir`), so a failed or interrupted export never leaves a
half-written checkpoint; ``--out`` is checked against the run and its inputs before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import transformers

from ..core.errors import UsageError
from ..core.faults import fault_point
from ..core.outputs import disk_guard, read_marker, staged_dir
from ..core.record import heldout_settings
from ..core.run_dir import EXPORT_REPORT, PLOT, stage2_model
from ..model.inject import load_lte, lte_layers, unload_lte
from .quantize import (
    InputImportance,
    KernelActivations,
    compress_checkpoint,
    describe_quantization,
    fake_quantize_,
    plan as quant_plan,
)
from .request import ExportRequest
from .thresholds import KEEP_ALL, choose_thresholds, dense_nll, max_sparsity_within, set_thresholds

logger = logging.getLogger("lte")

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
# configuration_lte.py's lines naming the base; write_checkpoint rewrites them
BASE_LINES = (
    'BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten by `lte export`',
    'BASE_MODEL_TYPE = "llama"  # rewritten by `lte export`',
)
CPU_KERNEL_FILE = "lte_kernels_cpu.py"  # kernels/cpu.py, imported by modeling_lte.py when present
TRITON_KERNEL_FILE = "lte_kernels_triton.py"  # kernels/triton_ffn.py, likewise
LAYOUT_FILE = "lte_layout.py"  # remote/layout.py, imported by modeling_lte.py
EXPERTS_FILE = "lte_experts.py"  # remote/experts.py (routed MoE experts), imported by modeling_lte.py
QUANT_FILE = "lte_quant.py"  # kernels/quant.py (the kernels' quantized rows), imported by modeling_lte.py
AUTO_MAP = {"AutoConfig": "configuration_lte.LTEConfig", "AutoModelForCausalLM": "modeling_lte.LTEForCausalLM"}


def auto_map(model_type: str, base: str) -> dict[str, str]:
    """``AUTO_MAP`` plus every other Auto class ``base`` is registered under for ``model_type``
    (a multimodal ``...ForConditionalGeneration`` is also AutoModelForImageTextToText's), so remote
    code runs sparse through each of them, not only through AutoModelForCausalLM."""
    import transformers.models.auto.modeling_auto as auto

    found = dict(AUTO_MAP)
    for name in sorted(dir(auto)):
        mapping = getattr(getattr(auto, name), "_model_mapping", None) if name.startswith("AutoModel") else None
        registered = getattr(mapping, "_model_mapping", {}).get(model_type)
        if registered == base or (isinstance(registered, (list, tuple)) and base in registered):
            found.setdefault(name, AUTO_MAP["AutoModelForCausalLM"])
    return found


VALIDATION_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


class ExportRefused(UsageError, RuntimeError):
    """The written checkpoint failed its reload check (non-finite weights or logits, or logits that
    differ from the trained model's): one message, exit 2, and nothing is written."""


def below_trained_sparsity(trained: float | None, target: float, margin: float = 0.05) -> str | None:
    """A warning when ``target`` lies more than ``margin`` below ``trained``, the sparsity the run
    was trained at (its report's ``sparsity``; None when unknown).

    Stage 2 adapts the model to its own routing; lowering the thresholds switches back on experts it
    learned to do without, which can cost perplexity instead of buying it (measured in docs/comparison.md,
    "A second, larger model")."""
    if trained is None or target >= trained - margin:
        return None
    return (
        f"trained at {100 * trained:.1f}% FFN sparsity; at {100 * target:.1f}% the thresholds switch experts back "
        f"on that stage 2 adapted the model to skip, which can be worse than the trained sparsity. For a sparsity "
        f"well below it, train a run that reaches it."
    )


def calibration_data(
    request: ExportRequest, recipe, tokenizer, data, keys: tuple[str, str] = ("--calibration", "--calibration-tokens")
):
    """The calibration blocks: the first ``calibration_tokens`` tokens of the run's training
    data (``data.train``), or of ``--calibration FILE``; ``keys`` name the two settings in messages
    (the recipe's ``export.calibration``/``export.calibration_tokens`` when the pipeline checks them)."""
    from ..training.data import load_documents, pack

    if request.calibration is None:
        source, blocks = f"the run's training data ({recipe.data.train})", data.train
    else:
        args = dataclasses.replace(recipe.data, train=request.calibration, format="text", max_train_tokens=None)
        source = request.calibration
        documents = load_documents(request.calibration, "train", args)  # an unreadable file is its own message
        try:
            blocks = pack(documents, tokenizer, args, None, source=request.calibration)
        except UsageError:  # no text, or less than one block: reported as too few tokens below
            blocks = []
    available = sum(len(row["input_ids"]) for row in blocks)
    if available < request.calibration_tokens:
        raise UsageError(
            f"{source} has only {available} tokens (in blocks of {recipe.data.block_size}), fewer than "
            f"{keys[1]} {request.calibration_tokens}; give more text ({keys[0]}) or fewer tokens"
        )
    return blocks


def base_architecture(model) -> str:
    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise UsageError(
            f"cannot export {name}: the exported code subclasses the model class, so it must ship with "
            f"transformers (remote-code base models are not supported yet)"
        )
    return name


def to_routed(model, thresholds: list[float]):
    """Convert an in-memory LTE model (LTEMLP wrappers) to the exported layout, in place: the
    base model with routed FFN projections (:mod:`lte.export.remote.modeling_lte`).

    ``config.lte_ffn["hosts"]`` lists every FFN with its own layout (``first`` in call order:
    ``first[0]`` owns the router), so layers may differ."""
    from .remote.layout import router_name
    from .remote.modeling_lte import install_routed_ffns, relayout_routed_ffns

    layers = lte_layers(model)
    paths = {id(module): name for name, module in model.named_modules()}
    hosts = [
        {
            "path": paths[id(layer)],
            "first": list(layer.spec.first),
            "down": layer.spec.down,
            "fused_chunks": layer.spec.fused_chunks,
            **({"experts": True} if getattr(layer, "routes_experts", False) else {}),
        }
        for layer in layers
    ]
    if len({layer.expert_size for layer in layers}) != 1:
        raise UsageError("cannot export a model whose FFN layers have different expert sizes")
    routers = [layer.lte_router for layer in layers]
    unload_lte(model)
    config = model.config
    config.lte_ffn = {"expert_size": layers[0].expert_size, "router_bias": routers[0].bias is not None, "hosts": hosts}
    config.lte_thresholds = [float(t) for t in thresholds]
    config.lte_routing = "hard"
    config.lte_track_sparsity = False
    install_routed_ffns(model, config)
    for host, router in zip(hosts, routers, strict=True):
        model.get_submodule(router_name(host)).load_state_dict(router.state_dict())
    relayout_routed_ffns(model)
    return model


def quantize_in_memory(model, scheme: str, batches=None):
    """Quantize the in-memory LTE model's Linear weights (:mod:`lte.export.quantize`) before tuning, so the
    thresholds, the held-out figures and the reload check all see the weights the checkpoint stores. With
    calibration ``batches``, each scale is searched against the inputs' mean squares on them (one dense pass)."""
    layers = lte_layers(model)
    if any(getattr(layer, "routes_experts", False) for layer in layers):
        raise UsageError(
            f"--quantize {scheme} is not built for mixture-of-experts exports yet (their routed experts are "
            f"3-D tensors, not Linear layers); export without --quantize"
        )
    quant = quant_plan(model, scheme, skip=[layer.lte_router for layer in layers])
    importance = None
    if batches is not None:
        with InputImportance(quant.modules) as importance:
            dense_nll(model, batches)
    fake_quantize_(quant, importance)
    logger.info("export: %s quantization of %d Linear layers in memory", scheme, len(quant.modules))
    return quant


# Loader arguments that tokenizers keep in ``init_kwargs`` and ``save_pretrained`` writes back.
TOKENIZER_LOADER_KEYS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "use_auth_token",
    "resume_download",
    "_commit_hash",
    "_from_auto",
)


def base_use_cache(config) -> bool:
    """The base configuration class's default ``use_cache`` (True where it cannot be built bare)."""
    try:
        return bool(getattr(type(config)(), "use_cache", True))
    except Exception:  # a configuration class that needs arguments
        return True


def write_checkpoint(model, tokenizer, directory: Path, base: str, **save_kwargs) -> None:
    """``save_pretrained`` + the routers file + config.json's ``auto_map`` and format version + the
    code files (model, config, layout, kernels); ``save_kwargs`` go to ``save_pretrained``.

    Format 2 (:mod:`lte.export.remote.layout`): the weight files hold only the base model's tensors,
    the routers are in ``lte/routers.safetensors``; ``model_type`` and ``architectures`` stay the
    base model's, so plain loaders and engines use the base class (dense) and ``auto_map`` sends
    ``trust_remote_code=True`` to the LTE classes (sparse)."""
    from .remote.layout import FORMAT_KEY, FORMAT_VERSION
    from .remote.modeling_lte import write_routers

    # Contiguous tensors: the kernels' re-strided weights are transposed views, which safetensors cannot
    # write where transformers de-duplicates shared tensors (Zamba's shared block). The routers are not
    # among the saved tensors (install_routed_ffns sets _keys_to_ignore_on_save).
    copies: dict = {}  # one copy per re-strided tensor, so tensors shared between names stay shared
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_contiguous():
            key = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if key not in copies:
                copies[key] = tensor.contiguous()
            tensor = copies[key]
        state_dict[name] = tensor
    model.save_pretrained(directory, **{"state_dict": state_dict, **save_kwargs})
    write_routers(model, directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=[base], auto_map=auto_map(config["model_type"], base), **{FORMAT_KEY: FORMAT_VERSION})
    if "use_cache" in config:  # the Trainer saves False; a plain model(ids) would return no cache
        config["use_cache"] = base_use_cache(model.config)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        saved = json.loads(tokenizer_config.read_text())
        clean = {k: v for k, v in saved.items() if k not in TOKENIZER_LOADER_KEYS}
        tokenizer_config.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
    import lte_kernels.cpu
    import lte_kernels.quant
    import lte_kernels.triton_ffn

    shutil.copyfile(lte_kernels.cpu.__file__, directory / CPU_KERNEL_FILE)
    shutil.copyfile(lte_kernels.triton_ffn.__file__, directory / TRITON_KERNEL_FILE)
    shutil.copyfile(lte_kernels.quant.__file__, directory / QUANT_FILE)
    shutil.copyfile(REMOTE_DIR / "modeling_lte.py", directory / "modeling_lte.py")
    shutil.copyfile(REMOTE_DIR / "layout.py", directory / LAYOUT_FILE)
    shutil.copyfile(REMOTE_DIR / "experts.py", directory / EXPERTS_FILE)
    source = (REMOTE_DIR / "configuration_lte.py").read_text()
    values = (base, model.config.model_type)  # the class, and the type its config and weight names follow
    for line, value in zip(BASE_LINES, values, strict=True):
        if line not in source:
            raise RuntimeError(f"configuration_lte.py lost its line {line!r}; the export cannot set the base class")
        name = line.split(" = ")[0]
        source = source.replace(line, f'{name} = "{value}"  # written by `lte export`')
    (directory / "configuration_lte.py").write_text(source)


def validation_inputs(batches) -> list[dict]:
    """Full calibration sequences (the masked path) and single tokens (the compact decode path)."""
    inputs = []
    for batch in batches:
        mask = batch.get("attention_mask")
        inputs.append({"input_ids": batch["input_ids"], **({} if mask is None else {"attention_mask": mask})})
        inputs.append({"input_ids": batch["input_ids"][:1, :1]})
    return inputs


@torch.no_grad()
def reference_logits(model, inputs: list[dict], decoding=contextlib.nullcontext) -> list[torch.Tensor]:
    """The in-memory model's logits on ``inputs``; the single tokens (the export's compact decode path) under the
    context ``decoding`` makes (:func:`decoding_context`)."""
    device = next(model.parameters()).device
    logits = []
    for x in inputs:
        with decoding() if x["input_ids"].numel() == 1 else contextlib.nullcontext():
            logits.append(model(**{k: v.to(device) for k, v in x.items()}).logits.float().cpu())
    return logits


def decoding_context(model, quant, device: torch.device, dtype: torch.dtype):
    """What the export computes decoding here, as a context for the in-memory model: where the remote code decodes
    on the CPU kernel (a CPU device, fp32/bf16 weights, the kernel built, no forced Triton that can run), the
    layers whose integer rows it reads multiply int8 activation blocks (:class:`KernelActivations`): an FFN's
    projections where its experts are whole groups (``expert_size`` a multiple of the group size, which is 32, the
    down projection's activation block too), every other quantized Linear with a whole number of 32-row slots
    (modeling_lte.py's ``install_quantized_rows``). Elsewhere the activations are multiplied as they are."""
    if quant is None or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return contextlib.nullcontext
    from lte_kernels import cpu, triton_ffn

    triton = os.environ.get("LTE_FORCE_TRITON") == "1" and triton_ffn.available()  # modeling_lte.py's switch
    if triton or not cpu.available():
        return contextlib.nullcontext
    size = {id(m): layer.expert_size for layer in lte_layers(model) for m in layer.base_layer.modules()}
    read = [m for m in quant.modules if size.get(id(m), m.out_features) % quant.group_size == 0]
    return lambda: KernelActivations(read)


@torch.no_grad()
def validate_export(directory: Path, inputs: list[dict], expected: list[torch.Tensor], dtype, device) -> float:
    """Load ``directory`` like a user would and compare its logits with ``expected`` (the
    in-memory LTE model's at the same thresholds). Returns the worst relative error; raises
    on a mismatch, on a non-finite weight and on non-finite logits."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype).to(device).eval()
    broken = [
        name
        for name, tensor in exported.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise ExportRefused(
            f"export validation failed: {len(broken)} weight(s) hold NaN or inf ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}); the trained model is broken, nothing was written. "
            f"Export an earlier checkpoint or retrain with a lower learning rate"
        )
    worst = 0.0
    for index, (x, want) in enumerate(zip(inputs, expected, strict=True)):
        got = exported(**{k: v.to(device) for k, v in x.items()}).logits.float().cpu()
        for name, logits in (("exported", got), ("trained", want)):
            if not torch.isfinite(logits).all():
                raise ExportRefused(
                    f"export validation failed: the {name} model's logits on validation input {index} "
                    f"hold NaN or inf; nothing was written. Check the run's dtype (fp16 overflows; "
                    f"use bf16 or fp32) and its training loss"
                )
        error = float((got - want).norm() / want.norm().clamp_min(1e-12))
        worst = max(worst, error)
    tolerance = VALIDATION_TOLERANCE.get(dtype, 3e-2)
    if not worst <= tolerance:
        raise ExportRefused(
            f"export validation failed: the exported model's logits differ from the trained model's "
            f"by {worst:.2e} (relative), above {tolerance:.0e}; nothing was written"
        )
    del exported
    return worst


def plot_export(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(report["per_layer_sparsity"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.4))
    ax.bar(
        [i - 0.2 for i in layers],
        [100 * s for s in report["per_layer_sparsity"]],
        width=0.4,
        label=f"{report['allocation']} (held-out)",
    )
    ax.bar(
        [i + 0.2 for i in layers],
        [100 * s for s in report["uniform_per_layer_sparsity"]],
        width=0.4,
        color="tab:gray",
        label="uniform (held-out)",
    )
    ax.axhline(100 * report["target_sparsity"], color="tab:red", linestyle="--", label="target")
    ax.set(xlabel="layer", ylabel="FFN neurons skipped (%)", ylim=(0, 100))
    ax.set_title(
        f"held-out ppl {report['sparse_ppl']:.3f} ({report['allocation']}) vs {report['uniform_ppl']:.3f} "
        f"(uniform); dense {report['dense_ppl']:.3f}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export(request: ExportRequest, progress: bool = True) -> dict:
    """Run an export; returns the content of ``lte_export.json``."""
    from ..training.config import load_run_recipe
    from ..training.data import LMData, build_data
    from ..training.evaluate import evaluate_lm
    from ..training.loading import (
        DTYPES,
        calibration_batches,
        collator_for,
        layout_report,
        layout_results,
        load_report,
        load_tokenizer,
        model_kwargs,
    )

    request.validate()
    run_dir = Path(request.run_dir)
    source = stage2_model(run_dir)
    recipe = load_run_recipe(run_dir)
    run_report = load_report(run_dir)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    blocks = calibration_data(request, recipe, tokenizer, data)
    batch_size = recipe.train.get("per_device_eval_batch_size", 8)
    batches = calibration_batches(
        LMData(blocks, data.eval, data.padded), tokenizer, request.calibration_tokens, batch_size
    )
    dtype = DTYPES[recipe.model.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_lte(source, **model_kwargs(recipe)).to(device).eval()
    base = base_architecture(model)
    dtype = next(model.parameters()).dtype if dtype == "auto" else dtype
    quant = quantize_in_memory(model, request.quantize, batches) if request.quantize is not None else None

    if request.target_sparsity is not None:
        if warning := below_trained_sparsity(run_report.get("sparsity"), request.target_sparsity):
            logger.warning("export: %s %s", run_dir, warning)
        logger.info(
            "export: tuning thresholds for %.1f%% FFN sparsity on %d calibration tokens (%s allocation)",
            100 * request.target_sparsity,
            request.calibration_tokens,
            request.allocation,
        )
        calib_dense_ppl = math.exp(dense_nll(model, batches))
        fault_point("export:tuning")  # test-only
        chosen, uniform = choose_thresholds(
            model, batches, request.target_sparsity, request.allocation, progress=progress
        )
        target = request.target_sparsity
    else:
        logger.info(
            "export: searching the highest sparsity within +%.1f%% calibration perplexity", request.max_ppl_increase
        )
        fault_point("export:tuning")  # test-only
        chosen, calib_dense_ppl = max_sparsity_within(
            model, batches, request.max_ppl_increase / 100, request.allocation, progress=progress
        )
        target = round(chosen.sparsity, 4)
        _, uniform = choose_thresholds(model, batches, target, "uniform", progress=progress)
        logger.info(
            "export: %.1f%% sparsity keeps calibration ppl at %.4f (dense routing %.4f)",
            100 * target,
            chosen.ppl,
            calib_dense_ppl,
        )

    # Held-out: the run's eval split, which calibration never reads.
    collator = collator_for(data, tokenizer)
    set_thresholds(model, uniform.thresholds)
    uniform_heldout = evaluate_lm(model, data.eval, collator, batch_size, desc="Held-out (uniform allocation)")
    set_thresholds(model, [KEEP_ALL] * len(chosen.thresholds))
    dense = evaluate_lm(model, data.eval, collator, batch_size, desc="Held-out (all experts)")
    layouts = layout_results("dense", model, data, tokenizer, batch_size)
    set_thresholds(model, chosen.thresholds)
    sparse = evaluate_lm(model, data.eval, collator, batch_size, desc="Held-out (exported thresholds)")
    layouts |= layout_results("sparse", model, data, tokenizer, batch_size)
    original_ppl = run_report.get("dense_ppl")

    marker = {
        "source_run": str(run_dir.resolve()),
        "settings": {**request.settings(), **heldout_settings(recipe.to_dict())},
        "stage2_id": (read_marker(source) or {}).get("id"),
    }
    with disk_guard(request.out), staged_dir(request.out, "export", marker, overwrite=request.overwrite) as tmp:
        inputs = validation_inputs(batches[:2])
        expected = reference_logits(model, inputs, decoding_context(model, quant, device, dtype))
        kinds = [
            "routed experts" if getattr(layer, "routes_experts", False) else "dense FFNs" for layer in lte_layers(model)
        ]
        weights = ffn_weights_per_token(model, batches[:1])
        to_routed(model, chosen.thresholds)
        write_checkpoint(model, tokenizer, tmp, base)
        quantization = None
        if quant is not None:
            quantization = compress_checkpoint(tmp, model, quant)
            logger.info("export: %s", describe_quantization(quantization))
        del model
        error = validate_export(tmp, inputs, expected, dtype, device)
        logger.info("export: reloaded checkpoint matches the trained model (relative logit error %.1e)", error)
        report = {
            "source_run": str(run_dir.resolve()),
            "stage2_model": str(source.resolve()),
            "target_sparsity": target,
            "max_ppl_increase": request.max_ppl_increase,
            "allocation": chosen.allocation,
            "calibration": request.calibration or recipe.data.train,
            "calibration_tokens": request.calibration_tokens,
            "calibration_sparsity": chosen.sparsity,
            "calibration_per_layer_sparsity": chosen.per_layer_sparsity,
            "calibration_ppl": chosen.ppl,
            "calibration_dense_ppl": calib_dense_ppl,
            "uniform_calibration_ppl": uniform.ppl,
            "heldout": recipe.data.eval or f"{recipe.data.eval_fraction:.0%} of {recipe.data.train}",
            "heldout_tokens": sparse.tokens,
            "heldout_sparsity": sparse.sparsity,
            "per_layer_sparsity": sparse.per_layer_sparsity,
            "sparsity_by_kind": sparsity_by_kind(kinds, sparse.per_layer_sparsity),
            "ffn_bytes_per_token": ffn_bytes_by_kind(
                kinds, weights, sparse.per_layer_sparsity, ffn_bits(dtype, quantization)
            ),
            "thresholds": chosen.thresholds,
            "layer_targets": chosen.targets,
            "dense_ppl": dense.ppl,
            "sparse_ppl": sparse.ppl,
            "ppl_increase": sparse.ppl / dense.ppl - 1,
            "original_ppl": original_ppl,
            "uniform_ppl": uniform_heldout.ppl,
            "uniform_heldout_sparsity": uniform_heldout.sparsity,
            "uniform_per_layer_sparsity": uniform_heldout.per_layer_sparsity,
            "layouts": layout_report(layouts),  # the same held-out tokens after BOS, after EOS, packed
            "validation_error": error,
            "base_architecture": base,
            "quantization": quantization,
        }
        (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        plot_export(report, tmp / PLOT)
        fault_point("export:written")  # test-only
    return report


def sparsity_by_kind(kinds: list[str], per_layer: list[float]) -> dict[str, float]:
    """Mean sparsity over each kind of host (an MoE model's routed experts apart from its dense and
    shared-expert FFNs): the overall figure is the mean over all hosts, which can hide one kind's."""
    by_kind: dict[str, list[float]] = {}
    for kind, value in zip(kinds, per_layer, strict=True):
        by_kind.setdefault(kind, []).append(value)
    return {kind: sum(values) / len(values) for kind, values in by_kind.items()}


@torch.no_grad()
def ffn_weights_per_token(model, batches) -> list[float]:
    """Per LTE layer, the FFN weights one token multiplies with every group on: (gate, up, down), or (up, down)
    for a plain FFN, x neurons x hidden, times the experts a token runs in a routed-experts layer (the model's
    top-k, read on one forward over ``batches``)."""
    from ..model.experts import top_k_choices

    routed = any(getattr(layer, "routes_experts", False) for layer in lte_layers(model))
    chosen = {path: index.shape[1] for path, index in top_k_choices(model, batches).items()} if routed else {}
    paths = {id(module): name for name, module in model.named_modules()}
    out = []
    for layer in lte_layers(model):
        matrices = len(layer.spec.first) * layer.spec.fused_chunks + 1
        width, d_model = layer.num_experts * layer.expert_size, layer.lte_router.weight.shape[-1]
        experts = 1
        if getattr(layer, "routes_experts", False):
            if paths[id(layer)] not in chosen:
                raise RuntimeError(f"no top-k choice was recorded for the routed experts at {paths[id(layer)]}")
            experts = chosen[paths[id(layer)]]
        out.append(float(matrices * width * d_model * experts))
    return out


def ffn_bits(dtype: torch.dtype, quantization: dict | None) -> float:
    """Bits per FFN weight in the export: the quantized bits (scales included) where quantized."""
    if quantization is not None:
        return float(quantization["bits_per_quantized_weight"])
    return float(torch.finfo(dtype).bits)


def ffn_bytes_by_kind(kinds: list[str], weights: list[float], per_layer: list[float], bits: float) -> dict:
    """FFN weight bytes one token reads, per kind of host: with every group, and at the held-out sparsity
    (each layer's share of groups skipped; for routed experts, of the experts the token runs)."""
    out: dict[str, dict[str, float]] = {}
    for kind, n, sparsity in zip(kinds, weights, per_layer, strict=True):
        entry = out.setdefault(kind, {"all_groups": 0.0, "sparse": 0.0})
        entry["all_groups"] += n * bits / 8
        entry["sparse"] += n * (1 - sparsity) * bits / 8
    return out


def summary(report: dict, out: str | os.PathLike) -> str:
    from ..training.loading import layout_summary

    per_layer = " ".join(f"{100 * s:.0f}%" for s in report["per_layer_sparsity"])
    kinds = report.get("sparsity_by_kind") or {}
    if len(kinds) > 1:
        per_layer += "; " + ", ".join(f"{kind} {100 * s:.0f}%" for kind, s in kinds.items())
    original = f", original model {report['original_ppl']:.4f}" if report.get("original_ppl") else ""
    return (
        f"\nLTE export written: {out}\n"
        f"  FFN sparsity  target {100 * report['target_sparsity']:.1f}%, calibration "
        f"{100 * report['calibration_sparsity']:.1f}%, held-out {100 * report['heldout_sparsity']:.1f}% "
        f"({report['allocation']} allocation; per layer: {per_layer})\n"
        f"  held-out ppl  sparse {report['sparse_ppl']:.4f} vs all experts {report['dense_ppl']:.4f} "
        f"({100 * report['ppl_increase']:+.2f}%){original}; uniform allocation {report['uniform_ppl']:.4f}\n"
        + (
            f"  layouts       sparse: {layout_summary(report['layouts'])}\n"
            f"                all experts: {layout_summary(report['layouts'], 'dense')}\n"
            if report.get("layouts")
            else ""
        )
        + (f"  weights       {describe_quantization(report['quantization'])}\n" if report.get("quantization") else "")
        + (
            "  FFN reads     "
            + ", ".join(
                f"{kind} {b['sparse'] / 1e6:.3g} of {b['all_groups'] / 1e6:.3g} MB"
                for kind, b in report["ffn_bytes_per_token"].items()
            )
            + " per token\n"
            if report.get("ffn_bytes_per_token")
            else ""
        )
        + f"  load it with  AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
    )
