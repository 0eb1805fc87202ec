"""Which causal-LM architectures of the installed transformers LTE handles, measured, not listed.

For every entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random config is built
(:func:`tiny_config` shrinks the common size attributes generically), and the model goes
through what a user's run does: FFN detection, grouping (dense-routing logits equal the
original's), a few optimiser steps of stage 1 (soft routing, LTE losses) and stage 2 (hard
routing), export through :func:`lte.export.exporter.to_routed` + :func:`lte.export.exporter.write_checkpoint`,
then one subprocess that cannot import ``lte`` reloads every export
(``trust_remote_code=True``), compares its logits with the trained model's, generates, and
checks for NaN. Each architecture ends as ``works``, ``refused`` (LTE's own message),
``not built`` (no tiny config or model could be made locally: the reason), or ``failed``
(anything else: a bug). ``scripts/architectures.py`` writes ``docs/architectures.md`` from it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WORKS, REFUSED, NOT_BUILT, FAILED = "works", "refused", "not built", "failed"
TOKENS = 16
DENSE_TOLERANCE = 1e-5
EXPORT_TOLERANCE = 1e-3
MAX_PARAMETERS = 5_000_000

# Size attributes shrunk when a config has them (aliases through attribute_map included).
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "ffn_dim": 128,
    "n_inner": 128,
    "d_ff": 128,
    "ffn_hidden_size": 128,
    "intermediate_dim": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "rotary_dim": 8,
    "partial_rotary_factor": None,
    "sliding_window": 64,
    "attention_chunk_size": 64,
    "num_global_key_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "ssm_state_size": 16,
    "state_size": 16,
    "mamba_chunk_size": 16,
    "chunk_size": 16,
    "time_step_rank": 8,
    "d_inner": 128,
    "n_groups": 1,
    "d_model": 64,
    "dim_model": 64,
    "dim_ff": 128,
    "dff": 128,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_heads": 4,
    "n_head": 4,
    "n_embd": 64,
}
SPECIAL_TOKENS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "unk_token_id",
    "mask_token_id",
)


@dataclass
class Outcome:
    """One architecture's result."""

    model_type: str
    model_class: str
    status: str = FAILED
    reason: str = ""
    layout: str = ""
    dense_error: float | None = None
    export_error: float | None = None
    export_dir: str | None = None
    stages: dict = field(default_factory=dict)


def tiny_config(model_type: str):
    """A small random config of ``model_type``: every common size attribute it has, shrunk."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = {}
    for key, value in SIZES.items():
        if (
            key == "partial_rotary_factor"
            or not hasattr(base, key)
            or isinstance(getattr(type(base), key, None), property)
        ):
            continue
        current = getattr(base, key)
        if (isinstance(current, (int, float)) and not isinstance(current, bool)) or current is None:
            kwargs[key] = value
    for key in ("layer_types", "mlp_layer_types", "layers_block_type", "block_types"):
        current = getattr(base, key, None)
        if isinstance(getattr(type(base), key, None), property):
            continue
        if isinstance(current, (list, tuple)) and current:  # one layer of each kind, in order of appearance
            kinds = list(dict.fromkeys(current))
            layers = max(SIZES["num_hidden_layers"], len(kinds))
            kwargs["num_hidden_layers"] = max(kwargs.get("num_hidden_layers", 0), layers)
            kwargs[key] = (kinds * layers)[:layers]
    for key in SPECIAL_TOKENS:
        value = getattr(base, key, None)
        if isinstance(value, int) and value >= SIZES["vocab_size"]:
            kwargs[key] = min(2, SIZES["vocab_size"] - 1)
        elif isinstance(value, list):
            kwargs[key] = [v if v < SIZES["vocab_size"] else 2 for v in value]
    # A size some config cannot take (a property, a list sized by the layer count, a validator)
    # stays at its default: add the sizes one at a time, keeping those with which it still builds.
    try:
        return _buildable(model_type, kwargs)
    except Exception:
        pass
    for check_model in (False, True):
        kept = {}
        for key, value in kwargs.items():
            try:
                _buildable(model_type, {**kept, key: value}, check_model)
            except Exception:
                continue
            kept[key] = value
        try:
            return _buildable(model_type, kept)
        except Exception as exc:
            error = exc
    raise error


def _buildable(model_type: str, kwargs: dict, check_model: bool = True):
    """The config, once it also builds a (meta-device) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **kwargs)
    if not check_model:
        return config
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return config


def _expert_size(widths) -> int:
    return next(e for e in (16, 8, 4, 2, 1) if all(w % e == 0 and w // e >= 2 for w in widths) or e == 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _inputs(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, TOKENS), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _train(model, ids, routing: str, steps: int) -> list[float]:
    """``steps`` AdamW steps of one LTE stage on ``ids`` (task loss, plus LTE's losses when soft)."""
    from ..model.inject import set_lte_routing
    from ..model.layers import ROUTER_PREFIX, collect_router_scores
    from ..training.losses import efficiency_loss, separability_loss

    set_lte_routing(model, routing)
    for name, param in model.named_parameters():
        param.requires_grad_(routing == "soft" or ROUTER_PREFIX not in name)  # stage 2 freezes the routers
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        with collect_router_scores() as records:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if routing == "soft":
            loss = loss + 0.5 * efficiency_loss(records) + 0.01 * separability_loss(records)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{routing}-routing stage: loss {loss.item()}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return losses


def check_architecture(model_type: str, model_class: str, workdir: Path, tokenizer, steps: int = 2) -> Outcome:
    """Everything up to the export for one architecture (the reload is :func:`reload_exports`)."""
    import transformers

    from ..core.errors import UsageError
    from ..export.exporter import base_architecture, to_routed, write_checkpoint
    from ..model.detect import candidates, ffn_widths
    from ..model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing

    out = Outcome(model_type, model_class)
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        size = sum(p.numel() for p in skeleton.parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(
                f"the shrunk config still has {size / 1e6:.1f}M parameters (size attributes not recognised)"
            )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        ids = _inputs(
            config.vocab_size if isinstance(getattr(config, "vocab_size", None), int) else SIZES["vocab_size"]
        )
        with torch.no_grad():
            reference = _logits(model, ids)
            model.generate(ids[:1, :4], attention_mask=torch.ones_like(ids[:1, :4]), max_new_tokens=2, do_sample=False)
    except Exception as exc:  # the tiny model itself: a limit of this harness, not of LTE
        out.status, out.reason = NOT_BUILT, _first_line(exc)
        return out
    try:
        try:
            candidates(model)
            expert_size = _expert_size(ffn_widths(model).values())
            cfg = LTEModelConfig(expert_size=expert_size, router_init="centroid")
            inject_lte(model, cfg, progress=False, kmeans_iters=3)
            base = base_architecture(model)
        except UsageError as exc:
            out.status, out.reason = REFUSED, str(exc)
            return out
        from ..model.detect import describe
        from ..model.registry import layout_from_list

        out.layout = describe(layout_from_list(cfg.ffn_hosts))
        model.eval()
        set_lte_routing(model, "dense")
        with torch.no_grad():
            out.dense_error = _relative(_logits(model, ids), reference)
        if not out.dense_error <= DENSE_TOLERANCE:
            out.reason = f"dense-routing logits differ by {out.dense_error:.1e} after grouping"
            return out
        train_ids = _inputs(
            model.config.vocab_size
            if isinstance(getattr(model.config, "vocab_size", None), int)
            else SIZES["vocab_size"],
            seed=1,
        )
        out.stages["soft"] = _train(model, train_ids, "soft", steps)
        out.stages["hard"] = _train(model, train_ids, "hard", steps)
        set_lte_routing(model, "hard")
        layers = lte_layers(model)
        with torch.no_grad():
            expected = _logits(model, ids)
        to_routed(model, [layer.threshold for layer in layers])
        directory = workdir / model_type
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint(model, tokenizer, directory, base)
        torch.save({"ids": ids, "expected": expected}, workdir / f"{model_type}.expected.pt")
        out.export_dir = str(directory)
        out.status = "exported"
    except Exception as exc:
        out.status, out.reason = (
            FAILED,
            _first_line(exc) + " | " + traceback.format_exc().strip().splitlines()[-3][:200],
        )
    return out


# Runs in a clean interpreter (python -I, cwd outside the repository): proves the export
# needs only torch + transformers.
_RELOAD = r"""
import importlib.util, json, math, sys
repos = json.loads(sys.argv[2])
sys.path[:] = [p for p in sys.path if p and p not in repos]  # the checkout itself; its .venv's packages stay
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
if importlib.util.find_spec("lte") is not None:
    raise SystemExit("lte is importable in the reload process: the test would prove nothing")
import torch, transformers
results = {}
for name, directory in json.loads(sys.argv[1]).items():
    try:
        saved = torch.load(directory + ".expected.pt")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, trust_remote_code=True, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            ids = saved["ids"]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
            error = float((logits - saved["expected"]).norm() / saved["expected"].norm().clamp_min(1e-12))
            generated = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
            step = model(input_ids=generated).logits
        finite = bool(torch.isfinite(logits).all() and torch.isfinite(step).all())
        results[name] = {"error": error, "finite": finite, "generated": int(generated.shape[1] - 4)}
    except Exception as exc:
        text = str(exc).strip().splitlines()
        results[name] = {"exception": f"{type(exc).__name__}: {text[0] if text else ''}"[:300]}
print("RESULTS " + json.dumps(results))
"""


def reload_exports(outcomes: list[Outcome], workdir: Path) -> None:
    """Reload every export in one clean subprocess and set each outcome's final status."""
    exported = {o.model_type: o.export_dir for o in outcomes if o.status == "exported"}
    if not exported:
        return
    repos = sorted({str(Path(__file__).resolve().parents[2])} | {str(Path(p).resolve().parent) for p in _lte_paths()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"), PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _RELOAD, json.dumps(exported), json.dumps(repos)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    if line is None:
        raise RuntimeError(f"the reload subprocess failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    results = json.loads(line[len("RESULTS ") :])
    for o in outcomes:
        if o.status != "exported":
            continue
        r = results[o.model_type]
        if "exception" in r:
            o.status, o.reason = FAILED, f"reload: {r['exception']}"
        elif not r["finite"]:
            o.status, o.reason = FAILED, "reload: NaN or inf logits"
        elif not r["error"] <= EXPORT_TOLERANCE or not math.isfinite(r["error"]):
            o.status, o.reason = FAILED, f"reload: logits differ from the trained model's by {r['error']:.1e}"
        elif r["generated"] != 4:
            o.status, o.reason = FAILED, f"reload: generated {r['generated']} tokens, not 4"
        else:
            o.status, o.export_error = WORKS, r["error"]


def _lte_paths() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("lte")
    return [str(Path(p)) for p in (spec.submodule_search_locations or [])] if spec else []


def architectures() -> dict[str, str]:
    """Every causal-LM architecture of the installed transformers: model type -> class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def run_coverage(
    tokenizer_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    only: list[str] | None = None,
    steps: int = 2,
    progress: bool = False,
) -> list[Outcome]:
    """Check every architecture (or ``only`` these model types); returns one outcome each."""
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        outcomes = []
        for model_type, model_class in architectures().items():
            if only and model_type not in only:
                continue
            outcomes.append(check_architecture(model_type, model_class, work, tokenizer, steps))
            if progress:
                print(f"{model_type}: {outcomes[-1].status} {outcomes[-1].reason[:100]}", file=sys.stderr, flush=True)
        reload_exports(outcomes, work)
    return outcomes


def to_json(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(outcomes: list[Outcome]) -> str:
    """``docs/architectures.md``: a summary line and one row per architecture (no timings, so a
    rerun on the same transformers writes the same file)."""
    import transformers

    counts = {s: sum(o.status == s for o in outcomes) for s in (WORKS, REFUSED, NOT_BUILT, FAILED)}
    lines = [
        "# Architecture coverage",
        "",
        "Generated by `python scripts/architectures.py` (do not edit): every causal-LM architecture of the installed",
        f"transformers ({transformers.__version__}), each as a tiny random config, through FFN detection, grouping",
        "(dense-routing logits within 1e-5 of the original), two steps of stage 1 and of stage 2, export, and a reload",
        "in a process that cannot import `lte` (logits against the trained model's, `generate`, no NaN).",
        "`tests/model/test_architectures.py` reruns it and fails when this file is out of date.",
        "",
        (
            f"**{counts[WORKS]} work, {counts[REFUSED]} are refused, "
            f"{counts[NOT_BUILT]} could not be built as a tiny model here, {counts[FAILED]} failed** "
            f"(of {len(outcomes)})."
        ),
        "",
        "| model type | class | result | FFN layout found / reason |",
        "| --- | --- | --- | --- |",
    ]
    for o in outcomes:
        detail = o.layout if o.status == WORKS else o.reason
        lines.append(f"| `{o.model_type}` | `{o.model_class}` | {o.status} | {_cell(detail)} |")
    return "\n".join(lines) + "\n"
