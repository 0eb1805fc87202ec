"""The ``lte`` command: ``lte train``, ``lte export``, ``lte compare``, ``lte analyze``, ``lte generate``,
``lte bench``, ``lte convert-llama2c``, ``lte recipes``.

``train.py``, ``python -m lte train`` and ``lte train`` are one code path. Bad input
(:class:`~lte.core.errors.UsageError`) prints one message and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# The argument types (every numeric range of the command line, declared once) live with the flag
# generator, which the request dataclasses' modules import too.
from .core.cli_args import (  # noqa: F401
    add_dataclass_arguments,
    finite_float,
    fraction,
    from_namespace,
    name_list,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from .core.errors import UsageError


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    for noisy in ("datasets", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UsageError`: one line on stderr and exit code 2 through
    :func:`run_cli`, like every other bad input (and a return value, not SystemExit, in-process)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# What an interrupted command has left, in its own terms (Ctrl-C: exit 130, no traceback).
INTERRUPTED = {
    "train": "interrupted: rerun the same command to resume from the last checkpoint",
    "export": "interrupted: the export did not finish; rerun the same command to export again",
    "compare": "interrupted: the comparison did not finish; rerun the same command to compare again",
    "analyze": "interrupted: the analysis did not finish; rerun the same command to analyze again",
    "generate": "interrupted: generation stopped",
    "bench": "interrupted: the benchmark did not finish; rerun it for the full table",
    "convert-llama2c": "interrupted: the conversion did not finish; rerun the same command to convert again",
}


TRAIN_HELP = """\
usage: lte train recipe=NAME [key=value ...]
       python train.py recipe=NAME [key=value ...]
       accelerate launch train.py recipe=NAME [key=value ...]   (several GPUs)

Fine-tune a causal LM with LTE: an optional dense fine-tune (stage 0), grouping of each FFN's
neurons into experts and router initialisation, soft routing with the efficiency and
separability losses (stage 1), hard thresholded routing (stage 2), an evaluation, and an
export when the recipe asks for one. Every key is checked before anything runs; bad input is
one line and exit code 2. Rerunning the same command resumes where it stopped.

recipes:
  recipe=NAME           a shipped recipe (list them: `lte recipes`), or recipe=path/to/file.yaml

overrides (dotted key=value, applied over the recipe):
  output_dir=runs/NAME  where the run is written
  seed=N                random seed
  target_sparsity=S     train and export for FFN sparsity S (sets lte.* and export.*)
  reuse_from=RUN_DIR    take stage 0 and the expert grouping from a finished run
  model.KEY=VALUE       the model (model.name_or_path, model.dtype, ...)
  data.KEY=VALUE        the data (data.train, data.eval, data.block_size, ...)
  lte.KEY=VALUE         LTE's settings (lte.expert_size, lte.eta, lte.stage1_steps, ...)
  lora.KEY=VALUE        LoRA/QLoRA instead of full fine-tuning (lora.r=16, ...)
  train.KEY=VALUE       any transformers TrainingArguments field; train.stage1.KEY for one stage
  export.KEY=VALUE      the export after training (export.target_sparsity, ...)
  restart_from=STAGE    discard STAGE (stage0, prepare, stage1, stage2) and the ones after it first

example:
  lte train recipe=tiny output_dir=runs/tiny lte.eta=1.0 train.learning_rate=1e-4

Every recipe key with its type, default and meaning: docs/recipes.md. More: docs/training.md.
"""


def train(overrides: list[str]) -> int:
    """``recipe=NAME key=value ...``: validate the recipe, then run every stage. ``restart_from=STAGE``
    (not a recipe key: it acts once) discards that stage and the ones after it first."""
    from .training.config import load_recipe

    restart = [a for a in overrides if a.startswith("restart_from=")]
    overrides = [a for a in overrides if not a.startswith("restart_from=")]
    recipe = load_recipe(overrides)  # validates everything before any heavy import or write
    from .pipeline import run

    run(recipe, restart_from=restart[-1].split("=", 1)[1] if restart else None)
    return 0


def _cmd_train(args) -> int:
    return train(args.overrides)


def _cmd_convert(args) -> int:
    from .tools.convert import convert_llama2c

    out = convert_llama2c(args.model, args.tokenizer, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_export(args) -> int:
    from .export.exporter import export, summary

    report = export(from_namespace(request_class("export"), args))
    print(summary(report, args.out), flush=True)
    return 0


def _cmd_compare(args) -> int:
    from .compare.harness import compare
    from .compare.tasks import parse_tasks

    request = from_namespace(
        request_class("compare"), args, tasks=parse_tasks(args.tasks, args.task_dir) if args.tasks else {}
    )
    compare(request)
    print(
        f"\ncomparison written: {args.out}/results.md, results.json, sparsity_vs_ppl.png\n"
        + (Path(args.out) / "results.md").read_text(),
        flush=True,
    )
    return 0


def _cmd_wasserstein(args) -> int:
    from .compare.wasserstein import analyze

    report = analyze(from_namespace(request_class("analyze wasserstein"), args))
    print(f"\nWasserstein analysis written: {args.out} (wasserstein.json, distances.npz, wasserstein_histograms.png)")
    print(f"  dense ppl {report['dense_ppl']:.4f}")
    for row in report["experiment"]:
        print(
            f"  remove top {100 * row['fraction']:.0f}% by Wasserstein distance: "
            f"ppl {row['ppl_top_wasserstein_removed']:.4f}"
            f"   same number at random: {row['ppl_random_removed']:.4f}"
        )
    return 0


def _cmd_generate(args) -> int:
    from .tools.generate import describe, generate, load_export

    model, tokenizer = load_export(args.model_dir)
    routings = ["hard", "dense"] if args.compare_dense else ["hard"]
    results = [
        generate(model, tokenizer, args.prompt, args.max_new_tokens, routing, args.temperature, args.seed)
        for routing in routings
    ]
    for result in results:
        print(describe(result), flush=True)
    if args.compare_dense:
        from .tools.generate import speed_notes

        sparse, dense = results
        print(
            f"speed: {sparse.tokens_per_second / dense.tokens_per_second:.2f}x the dense model's tokens/s "
            f"(batch 1; see `lte bench decode` for medians over repeats)"
        )
        for line in speed_notes(model, sparse, dense):
            print(f"  {line}", flush=True)
    return 0


def _cmd_bench_kernel(args) -> int:
    from dataclasses import asdict

    from .tools.bench import DEFAULT_SHAPES, bench_kernel, kernel_table, machine, write_json

    sparsities = _sparsities(args.sparsity)
    shapes = args.shape.split(",") if args.shape else list(DEFAULT_SHAPES)
    rows = bench_kernel(shapes, sparsities, args.dtype, args.batch, args.expert_size, args.repeats, args.device)
    baselines = ", ".join(sorted({row.baseline for row in rows}))
    print(f"sparse FFN kernel vs dense {baselines}, {machine()}; medians of {args.repeats}")
    print(kernel_table(rows))
    if args.json:
        write_json([{**asdict(row), "device": machine()} for row in rows], args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_decode(args) -> int:
    from dataclasses import asdict

    from .tools.bench import bench_decode, write_json
    from .tools.generate import load_export

    if args.device != "cpu":
        raise UsageError(
            "--device cuda: decoding with a static cache and CUDA graphs is not built yet; use --device cpu"
        )
    model, tokenizer = load_export(args.model_dir, device="cpu")
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    result = bench_decode(model, prompt, args.new_tokens, args.repeats, name=str(args.model_dir))
    print(
        f"{args.model_dir} on {result.device}, {result.dtype}, batch 1, {result.new_tokens} new tokens, median of "
        f"{result.repeats}:\n  dense  {result.dense_tokens_per_s:.1f} tokens/s\n"
        f"  sparse {result.sparse_tokens_per_s:.1f} "
        f"tokens/s at {100 * result.sparsity:.1f}% FFN sparsity: {result.speedup:.2f}x"
    )
    if args.json:
        write_json(asdict(result), args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_serve(args) -> int:
    from .tools.bench import write_json
    from .tools.bench_serve import main_entry, rows_as_json, serve_table

    args.sparsities = _sparsities(args.sparsity)
    args.batches = _batches("--batch", args.batch)
    args.transformers_batches = _batches("--transformers-batch", args.transformers_batch or args.batch)

    def save(rows) -> None:  # after every run: an interrupted benchmark keeps what it measured
        if args.json and rows:
            write_json(rows_as_json(rows), args.json)

    rows = main_entry(args, on_rows=save)
    print(f"vLLM serving, {rows[0].engine} on {rows[0].device}; output tokens/s, medians of {args.repeats}")
    print(serve_table(rows))
    if args.json:
        save(rows)
        print(f"wrote {args.json}")
    return 0


def _batches(flag: str, text: str) -> list[int]:
    try:
        batches = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if any(b < 1 for b in batches):
        raise UsageError(f"{flag} {text}: every value must be at least 1")
    return batches


def _sparsities(text: str) -> list[float]:
    try:
        sparsities = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--sparsity {text!r}: expected comma-separated numbers, e.g. 0.5,0.9") from None
    if any(not 0 <= s < 1 for s in sparsities):
        raise UsageError(f"--sparsity {text}: every value must lie in [0, 1)")
    return sparsities


def _cmd_recipes(args) -> int:
    from .training.config import available_recipes, find_recipe

    for name in available_recipes():
        print(f"{name:<16} {find_recipe(name)}")
    return 0


class _PrintText(argparse.Action):
    """``-h``: print ``text`` (plain, as written) and exit 0."""

    def __init__(self, option_strings, dest, text: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help message and exit", **kwargs)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.text, end="")
        parser.exit()


# Commands whose flags are a request dataclass's fields (lte.core.cli_args): command words -> (module, class).
REQUESTS = {
    "export": ("lte.export.request", "ExportRequest"),
    "compare": ("lte.compare.harness", "CompareRequest"),
    "analyze wasserstein": ("lte.compare.wasserstein", "WassersteinRequest"),
}


def request_class(command: str):
    import importlib

    module, name = REQUESTS[command]
    return getattr(importlib.import_module(module), name)


def _wanted(command: str | None, name: str) -> bool:
    """Whether to fill ``name``'s flags: its request dataclass's module imports torch, so a
    command fills only its own (``command=None``: every command's, for tests)."""
    return command is None or command == name


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="lte", description="Learn-To-be-Efficient: train LLMs to activate fewer FFN neurons.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run an LTE recipe: lte train recipe=tiny [key=value ...]", add_help=False)
    p.add_argument("-h", "--help", action=_PrintText, text=TRAIN_HELP)
    p.add_argument("overrides", nargs="*", help="recipe=NAME followed by dotted key=value overrides")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser(
        "export", help="tune thresholds to a sparsity and write a checkpoint that loads with from_pretrained"
    )
    if _wanted(command, "export"):
        add_dataclass_arguments(p, request_class("export"), required_one_of=("target",))
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser(
        "compare", help="LTE against GRIFFIN, TEAL, CATS, MoEfication, Sparse Expansion and dense at matched sparsity"
    )
    if _wanted(command, "compare"):
        add_dataclass_arguments(p, request_class("compare"))
        # CompareRequest.tasks, from two flags:
        p.add_argument(
            "--tasks", help="zero-shot multiple-choice tasks: piqa,arc_easy,hellaswag,boolq (NAME or NAME=FILE)"
        )
        p.add_argument(
            "--task-dir",
            help="directory with piqa/, arc_easy/, hellaswag/, boolq/ (each in the layout it is distributed in)",
        )
    p.set_defaults(func=_cmd_compare)
    analyze = sub.add_parser("analyze", help="analyses: lte analyze wasserstein ...").add_subparsers(
        dest="analysis", required=True
    )
    p = analyze.add_parser(
        "wasserstein", help="Wasserstein distance of each FFN neuron from a Gaussian, and the removal experiment"
    )
    if _wanted(command, "analyze"):
        add_dataclass_arguments(p, request_class("analyze wasserstein"))
    p.set_defaults(func=_cmd_wasserstein)
    p = sub.add_parser("generate", help="generate text with an exported checkpoint; prints speed and sparsity")
    p.add_argument("model_dir", help="an exported checkpoint (from `lte export`)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="new tokens; generation stops earlier at the end of the model's context, with a note",
    )
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-dense", action="store_true", help="also run every expert and compare text and speed")
    p.set_defaults(func=_cmd_generate)
    bench = sub.add_parser("bench", help="benchmarks: lte bench kernel ...").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("kernel", help="time the sparse FFN kernel against the dense FFN, same process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", help="HIDDENxFFN[,HIDDENxFFN...] (default: 4096x11008,5120x13824, Llama-2-7B and 13B)")
    p.add_argument(
        "--sparsity", default="0.5,0.9", help="fractions of experts skipped, comma-separated (default 0.5,0.9)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "int8", "int4"],
        help="weights; int8/int4: group-32 quantized rows against torch's dense int GEMVs (CPU)",
    )
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--expert-size", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(func=_cmd_bench_kernel)
    p = bench.add_parser("decode", help="end-to-end decoding speed of an exported model against its dense self")
    p.add_argument("model_dir", help="an exported checkpoint (from `lte export`)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=_cmd_bench_decode)
    p = bench.add_parser(
        "serve", help="an export's decoding speed in vLLM: the LTE plugin against plain vLLM, and transformers"
    )
    p.add_argument("exports", nargs="*", help="exported checkpoints (from `lte export`); or --make-model")
    p.add_argument(
        "--make-model",
        metavar="DIR",
        help="build random TinyLlama-1.1B-shaped bf16 exports, one per --sparsity, under DIR (reused if built)",
    )
    p.add_argument("--sparsity", default="0.5,0.9", help="with --make-model: FFN sparsities (default 0.5,0.9)")
    p.add_argument("--batch", default="1,4,16", help="concurrent requests, comma-separated (default 1,4,16)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per request")
    p.add_argument("--prompt-tokens", type=positive_int, default=16, help="random prompt tokens per request")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument(
        "--vllm-python", default=".venv-vllm/bin/python", help="python of a vLLM environment (`make vllm-env`)"
    )
    p.add_argument("--cores", help="cores for every engine, e.g. 0-1 (default: all this process may use)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers generate")
    p.add_argument("--transformers-batch", help="batch sizes transformers runs (default: every --batch)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(func=_cmd_bench_serve)
    p = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint to a transformers checkpoint")
    p.add_argument("model", help="llama2.c model .bin")
    p.add_argument("tokenizer", help="SentencePiece tokenizer .model")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("recipes", help="list the available recipes")
    p.set_defaults(func=_cmd_recipes)
    return parser


def run_cli(func, *args, interrupted: str = INTERRUPTED["train"]) -> int:
    """Call ``func``; turn a UsageError into one line on stderr and exit code 2, Ctrl-C into
    ``interrupted`` and exit code 130 (both without a traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging()
    try:
        return func(*args)
    except UsageError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as exc:
        from .core.outputs import disk_full_path

        where = disk_full_path(exc)
        if where is None:
            raise
        print(
            f"error: no space left on device at {where}; free some space, then rerun the same command", file=sys.stderr
        )
        return 2


def _close_progress_bars() -> None:
    """Finish any progress bar still drawing, so the message gets a line of its own (and no bar is
    redrawn after it when the interpreter exits)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in INTERRUPTED), "train")
    return run_cli(_parse_and_run, argv, interrupted=INTERRUPTED[command])


def _parse_and_run(argv: list[str]) -> int:
    args = build_parser(next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
    return args.func(args)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``: the same as ``lte train``."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(TRAIN_HELP, end="")
        return 0
    return run_cli(train, argv)
