"""The ``lte`` command: ``lte train``, ``lte convert-llama2c``, ``lte recipes``.

``train.py``, ``python -m lte train`` and ``lte train`` are one code path. Bad input
(:class:`~lte.errors.UsageError`) prints one message and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UsageError


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    for noisy in ("datasets", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(overrides: list[str]) -> int:
    """``recipe=NAME key=value ...``: validate the recipe, then run every stage."""
    from .config import load_recipe

    recipe = load_recipe(overrides)  # validates everything before any heavy import or write
    from .pipeline import run

    run(recipe)
    return 0


def _cmd_train(args) -> int:
    return train(args.overrides)


def _cmd_convert(args) -> int:
    from .convert import convert_llama2c

    out = convert_llama2c(args.model, args.tokenizer, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_recipes(args) -> int:
    from .config import available_recipes, find_recipe

    for name in available_recipes():
        print(f"{name:<16} {find_recipe(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lte", description="Learn-To-be-Efficient: train LLMs to activate fewer FFN neurons.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run an LTE recipe: lte train recipe=tiny [key=value ...]")
    p.add_argument("overrides", nargs="*", help="recipe=NAME followed by dotted key=value overrides")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint to a transformers checkpoint")
    p.add_argument("model", help="llama2.c model .bin")
    p.add_argument("tokenizer", help="SentencePiece tokenizer .model")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("recipes", help="list the available recipes")
    p.set_defaults(func=_cmd_recipes)
    return parser


def run_cli(func, *args) -> int:
    """Call ``func``; turn a UsageError into one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging()
    try:
        return func(*args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``: the same as ``lte train``."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nusage: train.py recipe=NAME [key=value ...]   (see `lte recipes`)")
        return 0
    return run_cli(train, argv)
