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
    "n_group": 1,
    "topk_group": 1,
    "attention_head_size": 16,
    "vocab_size_per_layer_input": 512,
    "hidden_size_per_layer_input": 16,
    "intermediate_size_mlp": 128,
    "vision_output_dim": 64,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "index_n_heads": 4,
    "index_head_dim": 16,
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
    seconds: float | None = None


# Size attributes by the end of their name.
NAMED_SIZES = {"vocab_size": 512, "embed_dim": 64, "embedding_dim": 64}
# Per-family facts a default config gets wrong for a tiny build (data, not code paths): the
# default Bamba and Granite 4 hybrid configs have no attention layer (released checkpoints
# have some, and transformers' hybrid cache needs one); X-MOD needs a language for its
# adapters; Reformer's LM head needs is_decoder; DBRX's attention config takes its rope_theta.
FAMILY_FACTS = {
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "xmod": {"default_language": "en_XX"},
    # Reformer: the axial position embeddings' widths sum to hidden_size, and in training their shape
    # multiplies to the sequence length (the harness's 16 tokens); its layer count is attn_layers' length.
    "reformer": {
        "is_decoder": True,
        "axial_pos_embds_dim": [16, 48],
        "axial_pos_shape": [4, 4],
        "attn_layers": ["local", "lsh"],
        "attention_head_size": 16,
    },
    "moshi": {"ffn_dim": 256},  # its gated MLP is ffn_dim // 2 wide: not the hidden size
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},  # read by its attention, not defaulted
    "mamba2": {"num_heads": 8},  # hidden_size * expand = num_heads * head_dim
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # no default in the config
    # Cohere Compass's default RoPE parameters name no layer type, and its rotary embedding looks each one up.
    "cohere_compass_text": {
        "rope_parameters": {
            t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("sliding_attention", "full_attention")
        }
    },
}
# Causal LMs that transformers cannot train on text alone (LTE trains on text): the reason.
NEEDS_IMAGES = {
    "git": "GitForCausalLM's loss drops (image_size / patch_size)^2 + 1 positions for the image it expects "
    "in front of the text, so without pixel_values there is no loss to train on (LTE trains on text only)",
}
# Layer-index attributes: the first layers a family keeps dense (DeepSeek V3 family), shrunk
# with the layer count so a tiny model has a layer of each kind.
LAYER_COUNTS = {"first_k_dense_replace": 1, "first_dense_layers": 1, "num_kv_shared_layers": 0}
MAX_LAYERS = 8


def _raw(config, key: str, default=None):
    """``config.key`` without the ambiguity check of per-layer (heterogeneous) attributes."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    try:
        return getter(key, default) if getter else getattr(config, key, default)
    except Exception:
        return default


def _fields(config, numeric: bool = False) -> set[str]:
    """The attributes a config takes (dataclass fields and their ``attribute_map`` aliases);
    ``numeric``: only those declared with a number or None as default. The others are derived by
    the config from the rest (DeepSeek's ``head_dim``, Granite 4's ``mamba_d_head="auto"``), and
    are left to it."""
    import dataclasses

    def takes(default) -> bool:
        return not numeric or default is None or _number(default)

    if dataclasses.is_dataclass(config):
        names = {f.name for f in dataclasses.fields(config) if takes(f.default)}
    else:
        names = {k for k, v in vars(config).items() if takes(v)}
    return names | {alias for alias, target in getattr(config, "attribute_map", {}).items() if target in names}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shrunk(config) -> dict:
    """Keyword arguments that shrink ``config`` (sub-configs such as ``text_config`` and
    ``vision_config`` recursively, each as a full dict of the shrunk sub-config)."""
    fields = _fields(config, numeric=True)
    kwargs = {}
    for key, value in {**SIZES, **LAYER_COUNTS}.items():
        if key in fields and (_number(current := _raw(config, key)) or current is None):
            kwargs[key] = value
    # Sizes named like one (Inkling's unpadded_vocab_size, RoCBert's shape_embed_dim), or equal
    # to a shrunk size in the full config (xLSTM's embedding_dim, dots3's adapter_in_dim), follow it.
    sizes = {_raw(config, k): v for k, v in kwargs.items() if k in ("hidden_size", "vocab_size", "intermediate_size")}
    for key in sorted(fields - set(kwargs) - set(getattr(config, "attribute_map", {}))):
        current = _raw(config, key)
        if not isinstance(current, int) or isinstance(current, bool):
            continue
        pattern = next((v for suffix, v in NAMED_SIZES.items() if key.endswith(suffix)), None)
        if pattern is not None or current in sizes:
            kwargs[key] = pattern if pattern is not None else sizes[current]
    # Relations between sizes survive: head counts equal in the full config stay equal (MLA's
    # key-value heads are its heads), and head sizes shrink by one factor (DeepSeek's
    # qk_nope + qk_rope = head_dim, per layer too).
    heads = [k for k in kwargs if k.endswith("heads")]
    for i, b in enumerate(heads):
        kwargs[b] = next((kwargs[a] for a in heads[:i] if _raw(config, a) == _raw(config, b)), kwargs[b])
    dims = {k: int(v) for k in kwargs if k.endswith("head_dim") and _number(v := _raw(config, k))}
    if dims:
        factor = min(max(1, v // SIZES[k]) for k, v in dims.items())
        kwargs.update({k: v // factor if v % factor == 0 else SIZES[k] for k, v in dims.items()})
    vocab = kwargs.get("vocab_size", SIZES["vocab_size"])
    for key in SPECIAL_TOKENS:
        value = _raw(config, key)
        if isinstance(value, int) and value >= vocab:
            kwargs[key] = min(2, vocab - 1)
        elif isinstance(value, list):
            kwargs[key] = [v if v < vocab else 2 for v in value]
    kwargs.update(_layers(config, kwargs))
    for key in getattr(config, "sub_configs", {}):
        sub = _raw(config, key)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[key] = {**sub.to_dict(), **_shrunk(sub)}
    return kwargs


def _layers(config, kwargs: dict) -> dict:
    """A layer of each kind: the first layer of every distinct combination of per-layer values
    (``layer_types``-like lists and ``per_layer_config`` overrides, as Gemma 4's head_dim),
    with its per-layer sizes scaled as the global size they override is."""
    layers = _raw(config, "num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        return {}
    fields = _fields(config) - set(getattr(config, "attribute_map", {}))
    indices, lists = {}, {}
    for key in fields - set(SPECIAL_TOKENS):
        value = _raw(config, key)
        if not isinstance(value, (list, tuple)) or not value:
            continue
        if (  # layer indices (Llama 4's moe_layers): ascending, distinct, below the layer count
            "layer" in key
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < layers for v in value)
            and list(value) == sorted(set(value))
        ):
            indices[key] = set(value)
            continue
        if len(value) == layers:
            lists[key] = value
    spec = vars(config).get("_heterogeneity_spec")
    overrides = dict(spec.per_layer_overrides) if spec is not None else {}
    signatures = {}
    for i in range(layers):
        signature = json.dumps(
            ([lists[k][i] for k in sorted(lists)], [i in indices[k] for k in sorted(indices)], overrides.get(i, {})),
            sort_keys=True,
            default=str,
        )
        signatures.setdefault(signature, i)
    picked = list(signatures.values())
    picked = (picked * 2)[: max(SIZES["num_hidden_layers"], len(picked))]
    out = {"num_hidden_layers": len(picked)} if "num_hidden_layers" in kwargs or lists or indices or overrides else {}
    for key, value in indices.items():
        out[key] = [new for new, old in enumerate(picked) if old in value]
    for key, value in lists.items():
        row = [value[i] for i in picked]
        if key in SIZES and all(_number(v) for v in row):  # per-layer sizes (Gemma 3n's intermediate_size)
            row = [type(v)(max(1, round(SIZES[key] * v / max(value)))) for v in row]
        out[key] = row
    if overrides:
        out["per_layer_config"] = {
            new: {k: _scaled(config, kwargs, k, v) for k, v in overrides[old].items()}
            for new, old in enumerate(picked)
            if old in overrides
        }
    return out


def _scaled(config, kwargs: dict, key: str, value):
    """A per-layer override of a shrunk size, in the same ratio to the shrunk size."""
    base = _raw(config, key)
    if key in kwargs and _number(value) and _number(base) and base:
        return type(value)(max(1, round(kwargs[key] * value / base)))
    return value


def _kinds(config) -> set:
    """Every per-layer value of a config's layer-kind lists (properties such as Jamba's included)."""
    kinds = set()
    for key in ("layer_types", "layers_block_type", "mlp_layer_types", "block_types"):
        value = _raw(config, key)
        if isinstance(value, (list, tuple)):
            kinds |= {(key, json.dumps(v, default=str)) for v in value}
    return kinds


def tiny_config(model_type: str):
    """A small random config of ``model_type``: every size attribute it takes shrunk, its
    sub-configs too, and a layer of each kind."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = _shrunk(base)
    for key, value in FAMILY_FACTS.get(model_type, {}).items():  # a sub-config's facts join its shrunk sizes
        kwargs[key] = {**kwargs[key], **value} if isinstance(kwargs.get(key), dict) else value
    # A layer kind the shrunk layer count lost (Jamba's attention every 8th layer from the 4th): more layers.
    try:
        config = _buildable(model_type, kwargs, check_model=False)
        layers = kwargs.get("num_hidden_layers")
        while layers and _kinds(config) < _kinds(base) and layers < min(MAX_LAYERS, _raw(base, "num_hidden_layers")):
            layers += 1
            kwargs["num_hidden_layers"] = layers
            config = _buildable(model_type, kwargs, check_model=False)
    except Exception:
        pass
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

    config = AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))
    if not check_model:
        return config
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return config


def _default_build_error(model_type: str) -> str | None:
    """Why transformers itself cannot build the causal LM of ``model_type``'s default config on this machine (on
    the meta device); None when it can. Said beside a tiny build's failure, whose cause may differ: a default
    that does not build, or a package this machine lacks, is outside this project's reach."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type))
    except Exception as exc:
        return _first_line(exc)
    return None


def _expert_size(widths) -> int:
    return next(e for e in (16, 8, 4, 2, 1) if all(w % e == 0 and w // e >= 2 for w in widths) or e == 1)


def _first_line(exc: BaseException) -> str:
    """The message's first line (and the next, when the first ends in ':' as 'install it with pip:')."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = " ".join(text[:2]) if text and text[0].endswith(":") else (text[0] if text else "")
    return f"{type(exc).__name__}: {head}"[:300]


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
    if model_type in NEEDS_IMAGES:
        out.status, out.reason = NOT_BUILT, NEEDS_IMAGES[model_type]
        return out
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
        if (error := _default_build_error(model_type)) is not None:
            out.reason += f"; transformers' own default {model_type} config does not build here either: {error}"
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

        layout = layout_from_list(cfg.ffn_hosts)
        routed = {name for name, module in model.named_modules() if getattr(module, "routes_experts", False)}
        dense = describe({p: s for p, s in layout.items() if p not in routed})
        experts = describe({p: s for p, s in layout.items() if p in routed})
        out.layout = "; ".join(filter(None, [dense, experts and f"routed experts: {experts}"]))
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


def reload_exports(outcomes: list[Outcome], workdir: Path, workers: int = 1) -> None:
    """Reload every export in clean subprocesses (``workers`` of them, each a share of the
    exports) and set each outcome's final status."""
    exported = {o.model_type: o.export_dir for o in outcomes if o.status == "exported"}
    if not exported:
        return
    repos = sorted({str(Path(__file__).resolve().parents[2])} | {str(Path(p).resolve().parent) for p in _lte_paths()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    names = sorted(exported)
    shares = [{n: exported[n] for n in names[i::workers]} for i in range(max(1, workers))]
    procs = [
        subprocess.Popen(
            [sys.executable, "-I", "-c", _RELOAD, json.dumps(share), json.dumps(repos)],
            cwd=workdir,
            env={**env, "HF_MODULES_CACHE": str(workdir / f"modules{i}")},  # one remote-code cache each
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, share in enumerate(shares)
        if share
    ]
    results = {}
    try:
        for proc in procs:
            stdout, stderr = proc.communicate()
            line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULTS ")), None)
            if line is None:
                raise RuntimeError(f"a reload subprocess failed (exit {proc.returncode}): {stderr[-2000:]}")
            results.update(json.loads(line[len("RESULTS ") :]))
    finally:  # one failed: the others are not left running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
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


def _check_one(args: tuple) -> Outcome:
    """One architecture in a pool worker (one thread each: the workers share the cores)."""
    import time

    import transformers

    model_type, model_class, work, tokenizer_dir, steps = args
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    outcome = check_architecture(
        model_type, model_class, Path(work), transformers.AutoTokenizer.from_pretrained(tokenizer_dir), steps
    )
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome


def run_coverage(
    tokenizer_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    only: list[str] | None = None,
    steps: int = 2,
    progress: bool = False,
    workers: int | None = None,
) -> list[Outcome]:
    """Check every architecture (or ``only`` these model types) in ``workers`` processes (default:
    one per core, at most 2); returns one outcome each, in model-type order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or max(1, min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        jobs = [
            (model_type, model_class, str(work), str(tokenizer_dir), steps)
            for model_type, model_class in architectures().items()
            if not only or model_type in only
        ]
        outcomes = []
        # spawn, not fork: a forked torch process can deadlock in its thread pools.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for outcome in pool.map(_check_one, jobs):
                outcomes.append(outcome)
                if progress:
                    print(f"{outcome.model_type}: {outcome.status} {outcome.reason[:100]}", file=sys.stderr, flush=True)
        reload_exports(outcomes, work, workers)
    return outcomes


def short_reason(outcome: Outcome) -> str:
    """The reason's first clause (no sizes or shapes): what the expectations file records."""
    import re

    if outcome.status != REFUSED:  # exceptions: their first 100 characters
        return outcome.reason[:100]
    text = re.sub(r" \([^()]*(\([^()]*\)[^()]*)*\)", "", outcome.reason)  # no parentheses (sizes, shapes)
    return re.split(r"[:;]", text)[0][:100]


def expectations(outcomes: list[Outcome]) -> dict:
    """The checked-in expectations (tests/model/architectures_expected.json): status and short reason per type."""
    import transformers

    return {
        "transformers": transformers.__version__,
        "architectures": {o.model_type: {"status": o.status, "reason": short_reason(o)} for o in outcomes},
    }


def compare_expected(outcomes: list[Outcome], expected: dict) -> tuple[list[str], list[str]]:
    """(regressions, notes) of a run against the expectations. A regression: a row that worked
    and does not (on any transformers), or, on the expectations' transformers version, any
    changed status. Notes: model types the expectations do not know (a newer transformers),
    types gone, and status changes on another version."""
    import transformers

    same_version = transformers.__version__ == expected["transformers"]
    known = expected["architectures"]
    regressions, notes = [], []
    for o in outcomes:
        want = known.get(o.model_type)
        if want is None:
            notes.append(f"new: {o.model_type} {o.status} {short_reason(o)}".rstrip())
            continue
        if want["status"] == o.status:
            continue
        line = f"{o.model_type}: expected {want['status']}, got {o.status}: {o.reason[:200]}".rstrip(": ")
        if want["status"] == WORKS or same_version:
            regressions.append(line)
        else:
            notes.append(line)
    gone = sorted(set(known) - {o.model_type for o in outcomes})
    if gone:
        notes.append(f"not in transformers {transformers.__version__}: {', '.join(gone)}")
    return regressions, notes


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
