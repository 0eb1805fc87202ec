"""Command-line flags generated from the request dataclasses, so a flag cannot drift from its field.

trl's idea (``HfArgumentParser``), sized to this CLI: each dataclass field becomes one flag,
``calibration_tokens`` -> ``--calibration-tokens``, with the field's default, its ``help`` and the
argparse type, choices and metavar in ``field(metadata=...)``. ``HfArgumentParser`` itself does not
fit: it spells flags with underscores, turns every bool into ``--x [true|false]`` plus ``--no_x``,
takes the type from the annotation only (no range types such as :func:`positive_int`), has no
positional arguments and cannot fill a subcommand's parser; its errors are argparse's usage block,
where this CLI's contract is one line and exit code 2 (:class:`lte.cli.Parser`).

Metadata keys: ``help``; ``type`` (an argparse type: one of the range types below, or any
``str -> value`` callable); ``choices``; ``metavar``; ``positional`` (True: a positional argument);
``one_of`` (a group name: the fields of a group are mutually exclusive); ``cli`` (False: no flag,
the command fills the field itself). A field without a default is a required flag.
This module imports nothing heavy: the dataclasses' modules import their argument types from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing


# Argument types: every numeric range of the command line is declared here, once, as an argparse
# ``type=``; a value out of range is one line naming the flag and what it takes (exit 2).
def _typed(convert, check, wants: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wants}; give {wants}")
        return value

    parse.__name__ = wants  # argparse names the type in some messages
    return parse


positive_int = _typed(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _typed(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _typed(float, math.isfinite, "a finite number")
nonnegative_float = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
fraction = _typed(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def name_list(text: str) -> list[str]:
    """``"a, b,"`` -> ["a", "b"]; nothing named is an error."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give comma-separated names such as dense,lte")
    return names


def number_list(text: str) -> list[float]:
    """``"0.5,0.7"`` -> [0.5, 0.7]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 0.5,0.7,0.9") from None


def count_or_all(text: str) -> int | None:
    """An integer >= 0, where 0 means no limit (None)."""
    return nonnegative_int(text) or None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field):
    """The field's default (its factory's value), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar(annotation) -> type:
    """``int | None`` -> int; ``list[str]`` -> list."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line arguments."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, required_one_of: tuple[str, ...] = ()) -> None:
    """One argument per field of ``cls`` (see the module docstring); ``required_one_of``: the
    ``one_of`` groups of which one flag must be given."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in cli_fields(cls):
        meta, default = f.metadata, field_default(f)
        kind = _scalar(hints[f.name])
        help_text = meta.get("help", "")
        shown = (
            default is not dataclasses.MISSING
            and default is not None
            and default is not False
            and default not in ({}, [])
        )
        if shown and "default" not in help_text:
            help_text = f"{help_text} (default: {_shown(default)})".strip()
        kwargs: dict = {"help": help_text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("type", kind if kind in (int, float, str) else str)
            for key in ("choices", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        if meta.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        target = parser
        if "one_of" in meta:
            group = meta["one_of"]
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group(required=group in required_one_of)
            target = groups[group]
        target.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def from_namespace(cls, namespace: argparse.Namespace, **extra):
    """``cls`` built from the parsed arguments (``extra``: the fields the command fills itself)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in cli_fields(cls)}, **extra)
