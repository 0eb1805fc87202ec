"""The command line is generated from the request dataclasses (lte/core/cli_args.py): a flag's default and
help are its field's; the recipe reference (docs/recipes.md) is generated from the same metadata;
and each concept has one dataclass with its defaults written once."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from lte.cli import REQUESTS, Parser, build_parser, main, request_class, train_main
from lte.core.cli_args import (
    add_dataclass_arguments,
    cli_fields,
    field_default,
    flag_name,
    from_namespace,
    positive_int,
)
from lte.core.errors import UsageError


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for word in command.split():  # "analyze wasserstein": a subcommand's subcommand
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("command", sorted(REQUESTS))
def test_every_flag_default_is_its_field_default(command):
    cls = request_class(command)
    sub = _subparser(build_parser(), command)
    actions = {a.dest: a for a in sub._actions}
    for f in cli_fields(cls):
        action = actions[f.name]
        if f.metadata.get("positional"):
            assert action.option_strings == [], f.name
            continue
        assert action.option_strings == [flag_name(f.name)], f.name
        default = field_default(f)
        if default is dataclasses.MISSING:
            assert action.required, f.name
        else:
            assert action.default == default, f.name
            assert not action.required, f.name


@pytest.mark.parametrize("command", sorted(REQUESTS))
def test_every_field_help_shows_in_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    squeezed = "".join(shown.split())  # argparse wraps lines, also after a hyphen
    fields = cli_fields(request_class(command))
    assert fields
    for f in fields:
        if not f.metadata.get("positional"):
            assert flag_name(f.name) in shown, f.name
        assert "".join(f.metadata["help"].split()) in squeezed, f.name
    assert {"export": "(default: 32768)", "compare": "(default: 16384)", "analyze wasserstein": "(default: 8192)"}[
        command
    ] in shown


@dataclasses.dataclass
class _Toy:
    path: str = dataclasses.field(metadata={"help": "where", "positional": True})
    name: str = dataclasses.field(metadata={"help": "a required flag"})
    size: int = dataclasses.field(default=8, metadata={"help": "blocks", "type": positive_int})
    rate: float | None = dataclasses.field(default=None, metadata={"help": "or a rate", "one_of": "goal"})
    count: int | None = dataclasses.field(default=None, metadata={"help": "or a count", "one_of": "goal"})
    mode: str = dataclasses.field(default="a", metadata={"help": "mode", "choices": ["a", "b"]})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast"})
    tags: dict = dataclasses.field(default_factory=dict, metadata={"cli": False})


def _toy_parser() -> Parser:
    parser = Parser(prog="toy")
    add_dataclass_arguments(parser, _Toy, required_one_of=("goal",))
    return parser


def test_generated_arguments_parse_into_the_dataclass():
    args = _toy_parser().parse_args(["p", "--name", "n", "--count", "3", "--fast", "--mode", "b"])
    toy = from_namespace(_Toy, args, tags={"x": 1})
    assert toy == _Toy(path="p", name="n", size=8, rate=None, count=3, mode="b", fast=True, tags={"x": 1})
    assert from_namespace(_Toy, _toy_parser().parse_args(["p", "--name", "n", "--rate", "0.5"])).rate == 0.5


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (
            ["p", "--name", "n", "--rate", "1", "--size", "0"],
            "argument --size: '0' is not an integer >= 1; give an integer >= 1",
        ),
        (["p", "--name", "n"], "one of the arguments --rate --count is required"),
        (["p", "--name", "n", "--rate", "1", "--count", "2"], "not allowed with argument"),
        (["p", "--rate", "1"], "the following arguments are required: --name"),
        (["p", "--name", "n", "--rate", "1", "--mode", "c"], "invalid choice: 'c'"),
    ],
)
def test_generated_arguments_reject_bad_input_in_one_line(argv, phrase):
    with pytest.raises(UsageError) as error:
        _toy_parser().parse_args(argv)
    message = str(error.value)
    assert phrase in message and "\n" not in message and message.startswith("toy: ")


def test_train_help_is_plain_text(capsys):
    assert train_main(["--help"]) == 0
    from_train_py = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == from_train_py
    for markup in ("``", ":class:", ":mod:", ":func:", "~lte."):
        assert markup not in from_train_py
    for part in ("usage: lte train recipe=NAME", "lte recipes", "key=value", "restart_from=STAGE", "docs/recipes.md"):
        assert part in from_train_py


def test_recipe_reference_matches_the_dataclasses():
    from lte.tools.recipe_docs import DOC, main as docs_main, render

    assert docs_main(["--check"]) == 0, "docs/recipes.md is stale: run `python -m lte.tools.recipe_docs`"
    text = DOC.read_text()
    assert "| `export.calibration_tokens` | `int` | `32768` | Calibration tokens. |" in text
    assert "| `lte.router_init` | `str` | `calibrated` |" in text
    assert render() == text


def test_export_request_is_the_recipe_export_section_plus_the_run():
    from lte.export.request import ExportRequest
    from lte.training.config import ExportArgs, load_recipe

    shared = {f.name: field_default(f) for f in dataclasses.fields(ExportArgs) if f.name != "out"}
    assert {f.name: field_default(f) for f in dataclasses.fields(ExportRequest) if f.name in shared} == shared
    recipe = load_recipe(
        ["recipe=tiny", "output_dir=runs/x", "export.calibration_tokens=1234", "export.allocation=uniform"],
        check_hardware=False,
    )
    request = ExportRequest.of_recipe(recipe, out="somewhere")
    assert (request.run_dir, request.out, request.calibration_tokens, request.allocation) == (
        "runs/x",
        "somewhere",
        1234,
        "uniform",
    )
    assert request.target_sparsity == recipe.export.target_sparsity


def test_one_validation_names_the_recipe_key_or_the_flag(tmp_path):
    from lte.export.request import ExportRequest
    from lte.training.config import ExportArgs

    with pytest.raises(UsageError, match=r"^export.target_sparsity=1.5 must lie in \[0, 1\)"):
        ExportArgs(target_sparsity=1.5).validate()
    with pytest.raises(UsageError, match=r"^--target-sparsity 1.5 must lie in \[0, 1\)"):
        ExportRequest(run_dir=str(tmp_path), out=str(tmp_path / "x"), target_sparsity=1.5).validate()
    with pytest.raises(UsageError, match=r"^--calibration-tokens 0 must be positive"):
        ExportRequest(run_dir=str(tmp_path), out="x", target_sparsity=0.5, calibration_tokens=0).validate()
    with pytest.raises(UsageError, match=r"^give one of --target-sparsity S or --max-ppl-increase P"):
        ExportRequest(run_dir=str(tmp_path), out="x", target_sparsity=None).validate()
    ExportArgs(target_sparsity=None).validate()  # a recipe may leave the export out


def test_export_flags_load_without_torch_or_transformers():
    """`lte export --help` and its checks build from a module that imports neither (it took ~10 s)."""
    code = (
        "import sys; from lte.cli import build_parser; build_parser('export'); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_saved_lte_config_takes_the_recipe_s_layer_settings_and_defaults():
    from lte.model.inject import LTELayerSettings, LTEModelConfig
    from lte.training.arguments import LTEArguments

    saved = {f.name for f in dataclasses.fields(LTELayerSettings)}
    assert saved <= {f.name for f in dataclasses.fields(LTEArguments)}
    assert LTEModelConfig().router_init == LTEArguments().router_init == "calibrated"
    args = LTEArguments(expert_size=16, threshold=0.4, router_init="centroid", router_init_scale=2.0, router_bias=True)
    config = LTEModelConfig.of(args)
    assert {name: getattr(config, name) for name in saved} == {name: getattr(args, name) for name in saved}
    assert config.ffn_hosts == []
