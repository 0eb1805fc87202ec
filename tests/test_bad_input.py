"""Bad input of every class gets one message that names the key or path and the fix, exit code 2,
no traceback, and nothing written; Ctrl-C says what stopped in the command's terms (exit 130).

Most cases run in-process (``lte.cli.main`` / ``train_main``: the same code path as the command
line, seconds each); a few run the real scripts in a subprocess for the no-traceback guarantee.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, STORIES
from lte.cli import INTERRUPTED, main, train_main

sys.path.insert(0, str(REPO / "scripts"))
from tiny_moe import write as write_moe

STORY = (
    "Once upon a time there was a little cat named Tom. Tom liked to play in the garden with his ball. "
    "One day the ball rolled away and Tom ran after it. "
)
LATIN1 = "Le café était fermé. Élodie a mangé une crêpe. ".encode("latin-1") * 40
# Random bytes with a NUL: what a wrong path (an archive, a model file) looks like.
GARBAGE = bytes(random.Random(0).randrange(256) for _ in range(4096)) + b"\0"

FILES = {  # name -> content, written into each test's tmp_path
    "ok.txt": (STORY * 30).encode(),
    "empty.txt": b"",
    "blank.txt": b"   \n\n\t  \n\n",
    "garbage.txt": GARBAGE,
    "latin1.txt": LATIN1,
    "broken.jsonl": b'{"text": "a story"}\n{"text": "unterminated\n',
    "broken.json": b'[{"text": "a story"}, {"text": ',
    "numbers.jsonl": b'{"text": 5}\n{"text": 6}\n',
    "one_story.txt": (STORY * 30).encode(),  # sample_by=document: one document, nothing to hold out
    "short.txt": STORY.encode(),  # fewer tokens than one block
    "list.yaml": b"- output_dir: runs/x\n- seed: 1\n",
    "malformed.yaml": b"output_dir: runs/x\nmodel: {name_or_path: [unclosed\n",
}


def _models(root: Path) -> None:
    """Damaged copies of the shipped model: truncated weights, no weights, no tokenizer; a tiny MoE model."""
    write_moe("qwen3_moe", root / "moe")
    for name in ("truncated", "no_weights", "no_tokenizer"):
        shutil.copytree(STORIES, root / name)
    weights = root / "truncated" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    (root / "no_weights" / "model.safetensors").unlink()
    for path in (root / "no_tokenizer").glob("tokenizer*"):
        path.unlink()


@pytest.fixture
def inputs(tmp_path):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    _models(tmp_path)
    return tmp_path


TRAIN = ["recipe=tiny", "output_dir={out}"]
DATA = lambda name: [f"data.train={{tmp}}/{name}", "data.eval={tmp}/ok.txt"]  # noqa: E731

# (id, argv with {tmp} (the inputs) and {out} (where nothing may appear), phrases the one line must hold:
# the key or path, and the fix)
CASES = [
    # data
    ("data-empty", TRAIN + DATA("empty.txt"), ["empty.txt", "give a file with text"]),
    ("data-whitespace", TRAIN + DATA("blank.txt"), ["blank.txt", "give a file with text"]),
    ("data-binary", TRAIN + DATA("garbage.txt"), ["garbage.txt", "binary", "give a UTF-8 text"]),
    (
        "data-invalid-jsonl",
        TRAIN + DATA("broken.jsonl"),
        ["broken.jsonl", "not valid JSON", "one JSON object per line"],
    ),
    ("data-invalid-json", TRAIN + DATA("broken.json"), ["broken.json", "not valid JSON", "fix the file"]),
    ("data-not-utf8", TRAIN + DATA("latin1.txt"), ["latin1.txt", "not UTF-8", "convert it to UTF-8"]),
    (
        "data-not-a-string",
        TRAIN + DATA("numbers.jsonl"),
        ["numbers.jsonl", "'text'", "int64", "make every 'text' a string"],
    ),
    (
        "data-one-document",
        [*TRAIN, "data.train={tmp}/one_story.txt", "data.eval=null"],
        ["data.train=", "one_story.txt", "set data.eval="],
    ),
    (
        "data-too-short",
        [*TRAIN, "data.train={tmp}/short.txt", "data.eval={tmp}/short.txt"],
        ["fewer than one block", "data.block_size"],
    ),
    (
        "data-eval-not-utf8",
        [*TRAIN, "data.train={tmp}/ok.txt", "data.eval={tmp}/latin1.txt"],
        ["latin1.txt", "convert it to UTF-8"],
    ),
    # models
    (
        "model-truncated-weights",
        [*TRAIN, "model.name_or_path={tmp}/truncated"],
        ["model.name_or_path", "truncated/model.safetensors", "damaged", "re-download"],
    ),
    (
        "model-no-weights",
        [*TRAIN, "model.name_or_path={tmp}/no_weights"],
        ["model.name_or_path", "no weights", "complete model directory"],
    ),
    (
        "model-no-tokenizer",
        [*TRAIN, "model.name_or_path={tmp}/no_tokenizer"],
        ["model.name_or_path", "tokenizer does not load", "tokenizer files"],
    ),
    (
        "lora-dropout-on-experts",
        [*TRAIN, "model.name_or_path={tmp}/moe", "lora.r=4"],
        ["lora.dropout=0.05", "routed experts", "set lora.dropout=0", "lora.target_parameters=[]"],
    ),
    (
        "model-attn-bogus",
        [*TRAIN, "model.attn_implementation=bogus"],
        ["model.attn_implementation='bogus'", "choose one of eager"],
    ),
    # recipes
    (
        "recipe-malformed-yaml",
        ["recipe={tmp}/malformed.yaml", "output_dir={out}"],
        ["malformed.yaml", "not valid YAML", "fix the file"],
    ),
    ("recipe-list-yaml", ["recipe={tmp}/list.yaml", "output_dir={out}"], ["list.yaml", "must be a YAML mapping"]),
    ("recipe-group-not-mapping", [*TRAIN, "lte=5"], ["'lte' must be a mapping", "lte.KEY=VALUE"]),
    (
        "recipe-stage-not-mapping",
        [*TRAIN, "train.stage1=5"],
        ["train.stage1 must be a mapping", "train.stage1.learning_rate="],
    ),
    ("recipe-seed-not-int", [*TRAIN, "seed=abc"], ["seed='abc' must be an integer", "seed=42"]),
    ("train-lr-not-number", [*TRAIN, "train.learning_rate=abc"], ["train.learning_rate='abc'", "a number", "e.g."]),
    (
        "train-stage-lr-not-number",
        [*TRAIN, "train.stage2.learning_rate=abc"],
        ["train.stage2.learning_rate='abc'", "e.g."],
    ),
    (
        "train-grad-accum-0",
        [*TRAIN, "train.gradient_accumulation_steps=0"],
        ["train.gradient_accumulation_steps=0 must be >= 1", "e.g."],
    ),
    ("train-batch-0", [*TRAIN, "train.per_device_train_batch_size=0"], ["train.per_device_train_batch_size=0", ">= 1"]),
    ("train-save-steps-0", [*TRAIN, "train.save_steps=0"], ["train.save_steps=0 must be > 0", "e.g."]),
    (
        "train-report-to-missing",
        [*TRAIN, "train.report_to=[no_such_tracker]"],
        ["train.report_to", "no_such_tracker", "is not installed", "pip install"],
    ),
    (
        "export-calibration-tokens",
        TRAIN + DATA("ok.txt") + ["export.calibration_tokens=100000000"],
        ["export.calibration_tokens 100000000", "give more text", "fewer tokens"],
    ),
    (
        "export-calibration-missing",
        [*TRAIN, "export.calibration={tmp}/missing.txt"],
        ["export.calibration=", "missing.txt", "file not found"],
    ),
    (
        "export-calibration-not-utf8",
        TRAIN + DATA("ok.txt") + ["export.calibration={tmp}/latin1.txt"],
        ["latin1.txt", "convert it to UTF-8"],
    ),
    # output_dir
    (
        "output-dir-is-a-file",
        ["recipe=tiny", "output_dir={tmp}/ok.txt"],
        ["output_dir=", "existing file", "choose another"],
    ),
    (
        "output-dir-under-a-file",
        ["recipe=tiny", "output_dir={tmp}/ok.txt/run"],
        ["output_dir=", "is a file", "choose another"],
    ),
    (
        "export-out-is-a-file",
        [*TRAIN, "export.out={tmp}/ok.txt"],
        ["export.out=", "existing file", "choose another export.out"],
    ),
    # command-line ranges
    (
        "compare-batch-size-0",
        ["compare", "--model", str(STORIES), "--data", "{tmp}/ok.txt", "--out", "{out}", "--batch-size", "0"],
        ["--batch-size", "'0'", "give an integer >= 1"],
    ),
    (
        "compare-device-tpu",
        ["compare", "--model", str(STORIES), "--data", "{tmp}/ok.txt", "--out", "{out}", "--device", "tpu"],
        ["--device", "'tpu'", "choose from"],
    ),
    (
        "compare-methods-empty",
        ["compare", "--model", str(STORIES), "--data", "{tmp}/ok.txt", "--out", "{out}", "--methods", ","],
        ["--methods", "names nothing", "dense,lte"],
    ),
    (
        "compare-data-not-utf8",
        ["compare", "--model", str(STORIES), "--data", "{tmp}/latin1.txt", "--out", "{out}"],
        ["--data", "latin1.txt", "convert it to UTF-8"],
    ),
    (
        "compare-data-empty",
        ["compare", "--model", str(STORIES), "--data", "{tmp}/blank.txt", "--out", "{out}"],
        ["--data", "blank.txt", "give a file with text"],
    ),
    (
        "compare-model-truncated",
        ["compare", "--model", "{tmp}/truncated", "--data", "{tmp}/ok.txt", "--out", "{out}"],
        ["--model", "truncated/model.safetensors", "damaged", "re-download"],
    ),
    (
        "compare-model-no-tokenizer",
        ["compare", "--model", "{tmp}/no_tokenizer", "--data", "{tmp}/ok.txt", "--out", "{out}"],
        ["--model", "tokenizer does not load", "tokenizer files"],
    ),
    (
        "analyze-model-no-weights",
        ["analyze", "wasserstein", "{tmp}/no_weights", "--data", "{tmp}/ok.txt", "--out", "{out}"],
        ["no_weights", "no weights", "complete model directory"],
    ),
    (
        "analyze-tokens-0",
        ["analyze", "wasserstein", str(STORIES), "--data", "{tmp}/ok.txt", "--out", "{out}", "--tokens", "0"],
        ["--tokens", "give an integer >= 1"],
    ),
    (
        "analyze-data-binary",
        ["analyze", "wasserstein", str(STORIES), "--data", "{tmp}/garbage.txt", "--out", "{out}"],
        ["--data", "garbage.txt", "binary"],
    ),
    (
        "bench-repeats-0",
        ["bench", "kernel", "--repeats", "0", "--json", "{out}/k.json"],
        ["--repeats", "give an integer >= 1"],
    ),
    (
        "bench-expert-size-0",
        ["bench", "kernel", "--expert-size", "0", "--json", "{out}/k.json"],
        ["--expert-size", "give an integer >= 1"],
    ),
    (
        "bench-serve-no-vllm-python",
        ["bench", "serve", "--make-model", "{out}/models", "--vllm-python", "{tmp}/no_venv/bin/python"],
        ["--vllm-python", "no_venv/bin/python", "make vllm-env"],
    ),
    (
        "bench-serve-batch-0",
        ["bench", "serve", "--make-model", "{out}/models", "--batch", "1,0"],
        ["--batch", "at least 1"],
    ),
    (
        "bench-serve-not-an-export",
        ["bench", "serve", "{tmp}", "--vllm-python", sys.executable],
        ["no config.json", "lte export"],
    ),
    (
        "bench-serve-export-and-make-model",
        ["bench", "serve", "{tmp}", "--make-model", "{out}/models", "--vllm-python", sys.executable],
        ["either", "--make-model"],
    ),
    (
        "generate-temperature-negative",
        ["generate", "{tmp}/export", "--temperature", "-1"],
        ["--temperature", "'-1'", "give a finite number >= 0"],
    ),
    (
        "generate-temperature-nan",
        ["generate", "{tmp}/export", "--temperature", "nan"],
        ["--temperature", "'nan'", "give a finite number >= 0"],
    ),
    (
        "generate-max-new-tokens-0",
        ["generate", "{tmp}/export", "--max-new-tokens", "0"],
        ["--max-new-tokens", "give an integer >= 1"],
    ),
    (
        "export-calibration-tokens-0",
        ["export", "{tmp}/run", "--target-sparsity", "0.5", "--out", "{out}", "--calibration-tokens", "0"],
        ["--calibration-tokens", "give an integer >= 1"],
    ),
    (
        "export-target-nan",
        ["export", "{tmp}/run", "--target-sparsity", "nan", "--out", "{out}"],
        ["--target-sparsity", "give a number in [0, 1)"],
    ),
]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def _command(argv: list[str], tmp: Path, out: Path) -> tuple[callable, list[str]]:
    argv = [a.format(tmp=tmp, out=out) for a in argv]
    return (train_main, argv) if argv[0].startswith("recipe=") else (main, argv)


def _assert_one_clear_line(err: str, phrases) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])


@pytest.mark.parametrize(("argv", "phrases"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, phrases, inputs, capsys):
    out = inputs / "out"
    before = _tree(inputs)
    func, args = _command(argv, inputs, out)
    code = func(args)
    err = capsys.readouterr().err
    assert code == 2, err
    _assert_one_clear_line(err, phrases)
    assert _tree(inputs) == before  # nothing written, nothing changed (the output directory included)


def test_output_dir_under_a_read_only_directory(inputs, capsys, monkeypatch):
    locked = inputs / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere but on a read-only filesystem; make this directory one
        import lte.pipeline

        real = os.access
        monkeypatch.setattr(
            lte.pipeline.os,
            "access",
            lambda path, mode: False if Path(path) == locked and mode & os.W_OK else real(path, mode),
        )
    try:
        assert train_main(["recipe=tiny", f"output_dir={locked}/run"]) == 2
        _assert_one_clear_line(
            capsys.readouterr().err,
            ["output_dir=", "locked", "is not writable", "set output_dir to a directory you can write to"],
        )
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# Ctrl-C in each command: (argv, the function the command runs, which raises KeyboardInterrupt there)
INTERRUPTS = [
    (["recipe=tiny", "output_dir={out}"], "lte.pipeline.run", INTERRUPTED["train"]),
    (
        ["export", "{tmp}/run", "--target-sparsity", "0.5", "--out", "{out}"],
        "lte.export.exporter.export",
        INTERRUPTED["export"],
    ),
    (
        ["compare", "--model", "m", "--data", "d", "--out", "{out}"],
        "lte.compare.harness.compare",
        INTERRUPTED["compare"],
    ),
    (
        ["analyze", "wasserstein", "m", "--data", "d", "--out", "{out}"],
        "lte.compare.wasserstein.analyze",
        INTERRUPTED["analyze"],
    ),
    (["generate", "{tmp}/export"], "lte.tools.generate.load_export", INTERRUPTED["generate"]),
    (["bench", "kernel"], "lte.tools.bench.bench_kernel", INTERRUPTED["bench"]),
]


@pytest.mark.parametrize(
    ("argv", "target", "message"), INTERRUPTS, ids=[m[0] if m[0] in INTERRUPTED else "train" for m, _, _ in INTERRUPTS]
)
def test_ctrl_c_is_one_line_in_the_command_s_terms(argv, target, message, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    func, args = _command(argv, tmp_path, tmp_path / "out")
    assert func(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == message
    assert message.startswith("interrupted") and ("rerun" in message or "stopped" in message)


def test_the_interrupt_messages_differ_by_command():
    assert INTERRUPTED["train"] == "interrupted: rerun the same command to resume from the last checkpoint"
    assert len(set(INTERRUPTED.values())) == len(INTERRUPTED)


# The real scripts, in fresh interpreters: no traceback reaches the terminal, whatever was imported.
SUBPROCESS = [
    (
        [sys.executable, "train.py", "recipe=tiny", "output_dir={out}", "data.train={tmp}/latin1.txt"],
        ["latin1.txt", "convert it to UTF-8"],
    ),
    (
        [sys.executable, "train.py", "recipe=tiny", "output_dir={out}", "model.name_or_path={tmp}/truncated"],
        ["truncated/model.safetensors", "re-download"],
    ),
    (
        [
            sys.executable,
            "-m",
            "lte",
            "compare",
            "--model",
            str(STORIES),
            "--data",
            "{tmp}/ok.txt",
            "--out",
            "{out}",
            "--batch-size",
            "0",
        ],
        ["--batch-size", "give an integer >= 1"],
    ),
]


@pytest.mark.parametrize(("argv", "phrases"), SUBPROCESS, ids=["train-data", "train-model", "compare-range"])
def test_bad_input_from_the_command_line_has_no_traceback(argv, phrases, inputs):
    out = inputs / "out"
    before = _tree(inputs)
    proc = subprocess.run(
        [a.format(tmp=inputs, out=out) for a in argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    _assert_one_clear_line(proc.stderr, phrases)
    assert _tree(inputs) == before


def _tiny_export(out: Path, context: int) -> None:
    """An LTE export of a random llama with the shipped tokenizer and a ``context``-token window."""
    import transformers
    from transformers import AutoTokenizer

    from lte.export.exporter import base_architecture, to_routed, write_checkpoint
    from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    inject_lte(model, LTEModelConfig(expert_size=8, router_init="centroid"), progress=False)
    set_lte_routing(model, "hard")
    thresholds = [0.5] * len(lte_layers(model))
    base = base_architecture(model)
    to_routed(model, thresholds)
    write_checkpoint(model, tokenizer, out, base)


def test_generate_stops_at_the_model_s_context_with_a_note(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    _tiny_export(export, context=24)
    prompt = "Once upon a time"
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(export)(prompt)["input_ids"])
    assert (
        main(["generate", str(export), "--prompt", prompt, "--max-new-tokens", "100000", "--temperature", "0.7"]) == 0
    )
    printed = capsys.readouterr().out
    room = 24 - prompt_tokens
    assert f"[{room} new tokens in" in printed  # seeded: the same tokens every run, no EOS among them
    assert (
        f"note: --max-new-tokens 100000 runs past the model's context of 24 tokens; stopped after {room} new tokens"
        in printed
    )
    assert main(["generate", str(export), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "[3 new tokens in" in printed and "note:" not in printed
    assert main(["generate", str(export), "--prompt", prompt * 10]) == 2  # a prompt that fills the whole context
    _assert_one_clear_line(
        capsys.readouterr().err, ["--prompt is", "the model's whole context of 24", "shorter prompt"]
    )


def test_sigint_during_training_is_one_line_and_exit_130(tmp_path):
    """A real Ctrl-C (SIGINT) of `train.py` in stage 1: the train message, exit 130, no traceback."""
    data = tmp_path / "stories.txt"
    data.write_text(STORY * 300)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "recipe=tiny",
            f"output_dir={out}",
            f"data.train={data}",
            f"data.eval={data}",
            "lte.stage1_steps=100000",
            "lte.router_init_tokens=1024",
            "lte.router_init_steps=5",
            "train.per_device_train_batch_size=2",
            "train.report_to=[]",
            "export.calibration_tokens=1024",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # A shell without job control starts background commands with SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: give the child the default handler, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # the logger's lines, as the run goes
        err.append(line)
        if "stage1: training" in line or time.monotonic() > deadline:
            break
    time.sleep(2)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    err.append(proc.stderr.read())
    code = proc.wait(timeout=120)
    err = "".join(err)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.rstrip().endswith(INTERRUPTED["train"]), err[-3000:]
