"""``lte bench serve``: an export's decoding speed in vLLM, sparse (this package's vLLM plugin) against plain
vLLM on the same export, with transformers ``generate`` of the same export in the same run.

Each vLLM configuration runs in its own process of the vLLM environment's python (``--vllm-python``;
``make vllm-env`` builds one), through ``vllm_bench_worker.py``:

* ``dense``: plain vLLM: every ``vllm.general_plugins`` entry point but this package's loads (``VLLM_PLUGINS``
  lists the others; an empty value loads none), so vLLM serves the export as the dense base model;
* ``sparse``: the same with the LTE plugin loaded;
* ``all_experts``: the plugin with every threshold overridden to 0 (``hf_overrides``; ``sigmoid(score) > 0``
  holds for every score), so every expert is selected but the plugin's own path runs (router, selection,
  kernels): what that path costs without sparsity (a diagnosis, not a baseline). -1, the export's "keep all",
  would hand the layer back to vLLM's dense code instead.

Every configuration and transformers get the same cores (``--cores``: vLLM's ``VLLM_CPU_OMP_THREADS_BIND``, and
this process's affinity and torch threads for transformers). Speed is output tokens/s: ``batch`` concurrent
requests of ``--prompt-tokens`` random tokens, each generating exactly ``--new-tokens`` greedy tokens, over the
wall time; medians over repeats, after a warm-up. ``--make-model`` builds the issue's model: random weights of
TinyLlama-1.1B's shapes with centroid routers and thresholds calibrated on random tokens (as
``bench/export_speed.py``), written by the project's exporter in bf16, one export per sparsity.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import UsageError

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_bench_worker.py")
RESULT_PREFIX = "LTE_BENCH_RESULT "  # the worker's result line (vllm_bench_worker.RESULT_PREFIX)
PLUGIN_GROUP = "vllm.general_plugins"
# TinyLlama-1.1B's shapes (its config.json), the model issue 27's speed targets are stated for.
TINYLLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
MODEL_MARKER = "lte_bench_model.json"  # what --make-model built here, so a rerun reuses it


@dataclass
class ServeRow:
    sparsity: float | None  # the export's target FFN sparsity
    batch: int  # concurrent requests
    dense_tokens_per_s: float  # plain vLLM (no LTE plugin): the export served dense
    sparse_tokens_per_s: float | None  # vLLM with the LTE plugin
    speedup: float | None  # sparse over plain vLLM, same run
    all_experts_tokens_per_s: float | None  # the plugin with every expert on
    transformers_tokens_per_s: float | None  # transformers generate, trust_remote_code, the export's routing
    transformers_sparsity: float | None  # FFN neurons skipped per token in transformers at batch 1
    engine: str
    device: str
    export: str
    new_tokens: int
    prompt_tokens: int
    repeats: int
    note: str | None = None  # why a column is empty (no plugin in the vLLM environment, a failed plugin run)


def parse_cores(text: str | None) -> list[int]:
    """``"0-3"``, ``"0,2"`` or None (every core this process may use)."""
    if text is None:
        return sorted(os.sched_getaffinity(0))
    cores = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cores += range(int(first), int(last or first) + 1)
    except ValueError:
        raise UsageError(f"--cores {text!r}: expected core ids like 0-1 or 0,2") from None
    unknown = sorted(set(cores) - os.sched_getaffinity(0))
    if not cores or unknown:
        raise UsageError(f"--cores {text!r}: cores {unknown} are not available to this process")
    return sorted(set(cores))


def check_vllm_python(path: str) -> None:
    if not Path(path).is_file() or not os.access(path, os.X_OK):
        raise UsageError(
            f"--vllm-python {path}: no such python; create the vLLM environment with `make vllm-env` "
            "(.venv-vllm) or give the python of an environment that has vLLM"
        )


def vllm_environment() -> dict[str, str]:
    """This process's environment without PYTHONPATH: the vLLM environment's own install of this package is what
    vLLM loads (a source tree on the path would also shadow its entry points with the tree's egg-info; ``-P``
    keeps the working directory off the path for the same reason)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def vllm_plugins(vllm_python: str) -> list[tuple[str, str]]:
    """(name, object) of the vLLM environment's ``vllm.general_plugins`` entry points."""
    probe = (
        "import importlib.metadata as md, json; "
        f"print(json.dumps([[e.name, e.value] for e in md.entry_points(group={PLUGIN_GROUP!r})]))"
    )
    result = subprocess.run([vllm_python, "-P", "-c", probe], capture_output=True, text=True, env=vllm_environment())
    if result.returncode:
        raise UsageError(f"--vllm-python {vllm_python} failed to list vLLM's plugins: {result.stderr.strip()[-500:]}")
    return [tuple(item) for item in json.loads(result.stdout)]


def is_ours(entry_point: str) -> bool:
    return entry_point.split(":")[0].split(".")[0] == "lte"


def run_worker(vllm_python: str, export: Path, plugins: list[str], overrides: dict, cores: list[int], args) -> dict:
    """One vLLM engine in the vLLM environment; returns the worker's report."""
    env = vllm_environment()
    env.update(
        VLLM_PLUGINS=",".join(plugins),  # exactly these general plugins load ("" loads none)
        VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)),
    )
    command = [
        vllm_python,
        "-P",  # neither the worker's folder (lte/tools) nor the working directory on sys.path
        str(WORKER),
        "--model",
        str(export),
        "--batches",
        ",".join(map(str, args.batches)),
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--repeats",
        str(args.repeats),
        "--hf-overrides",
        json.dumps(overrides),
    ]
    logger.info("bench serve: %s with VLLM_PLUGINS=%r %s", export.name, env["VLLM_PLUGINS"], overrides or "")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if result.returncode or not lines:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"vLLM run failed on {export} (VLLM_PLUGINS={env['VLLM_PLUGINS']!r}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def transformers_speeds(export: Path, cores: list[int], args, batches: list[int]) -> tuple[dict[int, float], float]:
    """tokens/s of ``generate`` per batch size (the export's own routing, trust_remote_code) and the FFN
    sparsity realised at batch 1."""
    import torch
    import transformers

    from .bench import median_seconds, run_counting_skips

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.bfloat16)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    speeds = {}
    sparsity = None
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(model.config.vocab_size, (batch, args.prompt_tokens), generator=generator)
            mask = torch.ones_like(ids)

            def decode(ids=ids, mask=mask):
                return model.generate(ids, attention_mask=mask, **kwargs)

            speeds[batch] = batch * args.new_tokens / median_seconds(decode, args.repeats)
            if batch == 1:
                _, per_layer = run_counting_skips(model, decode)
                sparsity = sum(per_layer) / len(per_layer)
    return speeds, sparsity


def bench_serve(exports: list[tuple[float | None, Path]], args, on_rows=None) -> list[ServeRow]:
    """Every export's rows. Runs go by importance, so an interrupted benchmark keeps the main figures: plain vLLM
    and the plugin for every export first, then the all-experts diagnosis, then transformers; ``on_rows`` gets
    the rows measured so far after each run."""
    from .bench import machine

    check_vllm_python(args.vllm_python)
    cores = parse_cores(args.cores)
    plugins = vllm_plugins(args.vllm_python)
    ours = [name for name, value in plugins if is_ours(value)]
    others = [name for name, value in plugins if not is_ours(value)]
    if not ours:
        logger.warning(
            "bench serve: %s has no LTE plugin (no %s entry point of this package): only plain vLLM and "
            "transformers are measured; install the package into that environment (`make vllm-env`)",
            args.vllm_python,
            PLUGIN_GROUP,
        )
    vllm: dict[tuple[int, str], dict] = {}  # (export index, engine) -> the worker's report
    hf: dict[int, tuple[dict[int, float], float | None]] = {}
    notes: dict[int, str] = {}
    transformer_batches = list(getattr(args, "transformers_batches", None) or args.batches)

    def rows() -> list[ServeRow]:
        out = []
        for e, (sparsity, export) in enumerate(exports):
            if (e, "dense") not in vllm:
                continue
            speeds = {
                key: {r["batch"]: r["tokens_per_s"] for r in vllm[e, key]["results"]} if (e, key) in vllm else {}
                for key in ("dense", "sparse", "all_experts")
            }
            hf_speeds, hf_sparsity = hf.get(e, ({}, None))
            for batch in args.batches:
                dense, sparse = speeds["dense"][batch], speeds["sparse"].get(batch)
                out.append(
                    ServeRow(
                        sparsity=sparsity,
                        batch=batch,
                        dense_tokens_per_s=dense,
                        sparse_tokens_per_s=sparse,
                        speedup=sparse / dense if sparse else None,
                        all_experts_tokens_per_s=speeds["all_experts"].get(batch),
                        transformers_tokens_per_s=hf_speeds.get(batch),
                        transformers_sparsity=hf_sparsity,
                        engine=vllm[e, "dense"]["engine"],
                        device=f"{machine()}, cores {','.join(map(str, cores))}",
                        export=str(export),
                        new_tokens=args.new_tokens,
                        prompt_tokens=args.prompt_tokens,
                        repeats=args.repeats,
                        note=notes.get(e, None if ours else f"{args.vllm_python} has no LTE plugin"),
                    )
                )
        return out

    def measured() -> None:
        if on_rows is not None:
            on_rows(rows())

    def plugin_run(e: int, key: str, overrides: dict) -> None:
        try:  # a failing plugin leaves its columns empty, with the reason: the other engines' figures stand
            vllm[e, key] = run_worker(args.vllm_python, exports[e][1], others + ours, overrides, cores, args)
        except RuntimeError as exc:
            logger.error("bench serve: %s", exc)
            notes[e] = f"LTE plugin run failed ({key}): {str(exc).strip().splitlines()[-1]}"
        measured()

    for e, (_, export) in enumerate(exports):
        vllm[e, "dense"] = run_worker(args.vllm_python, export, others, {}, cores, args)
        measured()
        if ours:
            plugin_run(e, "sparse", {})
    for e, (_, export) in enumerate(exports):
        if ours:
            thresholds = json.loads((export / "config.json").read_text())["lte_thresholds"]
            plugin_run(e, "all_experts", {"lte_thresholds": [0.0] * len(thresholds)})
    for e, (_, export) in enumerate(exports):
        if args.transformers and transformer_batches:
            logger.info("bench serve: %s in transformers, batches %s", export.name, transformer_batches)
            hf[e] = transformers_speeds(export, cores, args, transformer_batches)
            measured()
    return rows()


def serve_table(rows: list[ServeRow]) -> str:
    def f(value, spec=".1f", suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    lines = [
        (
            "| sparsity | batch | plain vLLM tok/s | LTE plugin tok/s | speedup | plugin, all experts tok/s "
            "| transformers tok/s |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {f(r.sparsity, '.0%')} | {r.batch} | {f(r.dense_tokens_per_s)} | {f(r.sparse_tokens_per_s)} "
            f"| {f(r.speedup, '.2f', 'x')} | {f(r.all_experts_tokens_per_s)} | {f(r.transformers_tokens_per_s)} |"
        )
    return "\n".join(lines)


def rows_as_json(rows: list[ServeRow]) -> list[dict]:
    return [asdict(row) for row in rows]


def make_serve_model(
    directory: Path, sparsities: list[float], seed: int = 0, progress: bool = True, shape: dict = TINYLLAMA_SHAPE
) -> list[Path]:
    """One bf16 export per sparsity of a random TinyLlama-1.1B-shaped Llama (same weights, centroid routers,
    thresholds calibrated on random tokens), written by the project's exporter; reused when already built."""
    settings = {"shape": shape, "seed": seed, "dtype": "bfloat16", "calibration": "random tokens 4x64"}
    paths = [directory / f"tinyllama-shape-s{round(100 * s)}" for s in sparsities]
    wanted = [(s, p) for s, p in zip(sparsities, paths, strict=True) if not _built(p, settings | {"sparsity": s})]
    for _, path in wanted:
        if path.exists():
            raise UsageError(
                f"--make-model: {path} exists and is not a model this command built with these settings; "
                "remove it or choose another --make-model folder"
            )
    if not wanted:
        return paths
    tokenizer_dir = Path(__file__).resolve().parents[2] / "assets" / "stories260K"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise UsageError(f"--make-model needs the repository's {tokenizer_dir} (run it from a clone)")

    import torch
    import transformers

    from ..export.exporter import base_architecture, to_routed, write_checkpoint
    from ..export.thresholds import calibrate
    from ..model.inject import LTEModelConfig, inject_lte, set_lte_routing

    logger.info("bench serve: building a random Llama of shape %s (fp32 while calibrating)", shape)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**shape)
    model = transformers.LlamaForCausalLM(config).eval()
    # expert grouping does not change speed on random weights: contiguous experts, no k-means
    inject_lte(model, LTEModelConfig(expert_size=32, router_init="centroid"), moefy_experts=False, progress=progress)
    set_lte_routing(model, "hard")
    tokens = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    layers = config.num_hidden_layers
    thresholds = {s: calibrate(model, [{"input_ids": tokens}], [s] * layers, progress=progress) for s, _ in wanted}
    base = base_architecture(model)
    to_routed(model, thresholds[wanted[0][0]])
    model.to(torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for sparsity, path in wanted:
        model.config.lte_thresholds = [float(t) for t in thresholds[sparsity]]
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)  # a previous build of ours that did not finish (never a user's folder: .tmp)
        tmp.mkdir(parents=True)
        write_checkpoint(model, tokenizer, tmp, base)
        (tmp / MODEL_MARKER).write_text(json.dumps(settings | {"sparsity": sparsity}, indent=2) + "\n")
        tmp.rename(path)
        logger.info("bench serve: wrote %s", path)
    return paths


def _built(path: Path, settings: dict) -> bool:
    marker = path / MODEL_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(settings))


def export_sparsity(export: Path) -> float | None:
    """The target sparsity an export records (``lte_export.json`` or our marker), if any."""
    for name, key in ((MODEL_MARKER, "sparsity"), ("lte_export.json", "target_sparsity")):
        if (export / name).is_file():
            return json.loads((export / name).read_text()).get(key)
    return None


def check_export(path: str) -> Path:
    export = Path(path)
    config = export / "config.json"
    if not config.is_file():
        raise UsageError(f"{path}: not an export (no config.json); give a folder written by `lte export`")
    if "lte_ffn" not in json.loads(config.read_text()):
        raise UsageError(f"{path}: config.json has no lte_ffn: not an LTE export; write one with `lte export`")
    return export


def main_entry(args, on_rows=None) -> list[ServeRow]:
    """The CLI's work: checks first, then the model (if asked for), then the runs."""
    check_vllm_python(args.vllm_python)
    parse_cores(args.cores)
    if bool(args.exports) == bool(args.make_model):
        raise UsageError("give either exports to benchmark or --make-model DIR (not both)")
    if args.make_model:
        paths = make_serve_model(Path(args.make_model), args.sparsities, progress=sys.stderr.isatty())
        exports = list(zip(args.sparsities, paths, strict=True))
    else:
        exports = [(export_sparsity(e), e) for e in map(check_export, args.exports)]
    return bench_serve(exports, args, on_rows)
