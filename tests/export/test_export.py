"""`lte export` and `lte generate`: thresholds that hit a sparsity, a checkpoint that loads
anywhere with trust_remote_code, and the bad-input contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_model
from lte.cli import main
from lte.export.exporter import ExportRequest, base_architecture, export, to_routed, write_checkpoint
from lte.export.thresholds import KEEP_ALL, Sensitivity, allocate, calibrate, evaluate_allocation, sensitivity
from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing
from lte.training.evaluate import evaluate_batches

# Runs in a fresh interpreter where `lte` cannot be imported: what a user of the export has.
LOAD_AS_A_USER = r"""
import json, pathlib, sys
sys.modules["lte"] = None  # the project is not importable
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

out = {}
for directory in sys.argv[1:]:
    d = torch.load(f"{directory}/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    ids = d["ids"]
    r = {"class": type(model).__name__, "base": type(model).__mro__[1].__name__}
    modeling = sys.modules[type(model).__module__]
    r["cpu_kernel"] = modeling._cpu_kernel_available is not None and modeling._cpu_kernel_available()
    r["triton_path"] = modeling._use_triton(torch.device("cpu"))  # True only with LTE_FORCE_TRITON=1
    with torch.no_grad():
        r["sparse"] = (model(ids).logits - d["sparse"]).abs().max().item()
        r["skips"] = (model(ids).logits - d["dense"]).abs().max().item()
        r["token"] = (model(ids[:1, :1]).logits - d["token"]).abs().max().item()
        r["few"] = (model(ids[:, :2]).logits - d["few"]).abs().max().item()  # 4 tokens: the union path
        # decoding with a KV cache (compact path) agrees with the full forward (masked path)
        full = model(ids[:1]).logits[0, -1]
        past = model(ids[:1, :-1], use_cache=True).past_key_values
        step = model(ids[:1, -1:], past_key_values=past, use_cache=True).logits[0, -1]
        r["decode"] = (step - full).abs().max().item()
        r["loss"] = model(ids, labels=ids).loss.item()
        model.config.lte_routing = "dense"
        r["dense"] = (model(ids).logits - d["dense"]).abs().max().item()
        model.config.lte_routing = "hard"
        model.config.lte_thresholds = [float("-inf")] * len(model.config.lte_thresholds)
        r["neg_inf"] = (model(ids).logits - d["dense"]).abs().max().item()
        model.config.lte_thresholds = d["thresholds"]
    r["generated"] = model.generate(ids[:1, :3], max_new_tokens=4, do_sample=False).shape[1]
    out[directory] = r
print("RESULT", json.dumps(out))
"""

# The real exported stories260K model, through the high-level APIs, where `lte` cannot be imported.
PIPELINE_AS_A_USER = r"""
import json, sys
sys.modules["lte"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

directory = sys.argv[1]
generator = pipeline("text-generation", model=directory, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
text = generator("Once upon a time", max_new_tokens=20, do_sample=False)[0]["generated_text"]
batch = tokenizer(["Once upon a time, there was a little girl named Lily."], return_tensors="pt")
loss = model(**batch, labels=batch["input_ids"]).loss.item()
print("RESULT", json.dumps({"text": text, "loss": loss}))
"""


def _result(stdout: str):
    return json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt"]


def _export_tiny(family: str, out: Path, tokenizer, **save_kwargs) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    inject_lte(model, LTEModelConfig(expert_size=8, router_init="centroid"), progress=False)
    set_lte_routing(model, "hard")
    thresholds = [0.45, 0.55]
    for layer, threshold in zip(lte_layers(model), thresholds, strict=True):
        layer.threshold = threshold
    with torch.no_grad():
        sparse, token, few = model(ids).logits, model(ids[:1, :1]).logits, model(ids[:, :2]).logits
    base = base_architecture(model)
    to_routed(model, thresholds)
    model.config.use_cache = False  # as the Trainer leaves it; the export restores the base default
    out.mkdir()
    write_checkpoint(model, tokenizer, out, base, **save_kwargs)
    torch.save(
        {"ids": ids, "dense": dense, "sparse": sparse, "token": token, "few": few, "thresholds": thresholds},
        out / "expected.pt",
    )


def test_export_round_trip_in_a_process_without_the_project(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    dirs = []
    for family in FAMILIES:
        _export_tiny(family, tmp_path / family, tokenizer)
        dirs.append(str(tmp_path / family))
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]  # the base model's
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lte.LTEForCausalLM"
    assert (tmp_path / "gpt2" / "modeling_lte.py").read_text().count('BASE_ARCHITECTURE = "GPT2LMHeadModel"') == 0
    configuration = (tmp_path / "gpt2" / "configuration_lte.py").read_text()
    assert 'BASE_ARCHITECTURE = "GPT2LMHeadModel"' in configuration and 'BASE_MODEL_TYPE = "gpt2"' in configuration
    results = _load_as_a_user(dirs, tmp_path)
    for family, directory in zip(FAMILIES, dirs, strict=True):
        r = results[directory]
        assert r["class"] == "LTEForCausalLM", family
        assert r["cpu_kernel"], family  # the export carries the CPU kernel and decoding uses it
        assert r["sparse"] < 1e-5, (family, r)  # several tokens: masked path, same as the trained model
        assert r["token"] < 1e-5, (family, r)  # one token: only the selected experts' rows are computed
        assert r["few"] < 1e-5, (family, r)  # a few tokens: the union of their experts
        assert r["decode"] < 1e-4, (family, r)
        assert r["skips"] > 1e-3, (family, r)  # the thresholds do skip experts...
        assert r["dense"] < 1e-5, (family, r)  # ...lte_routing="dense" runs every expert: the original model's logits
        assert r["neg_inf"] < 1e-5, (family, r)  # ...and so do thresholds at -inf
        assert 3.0 < r["loss"] < 6.0  # ln(64) ~ 4.16 for a random tiny model
        assert r["generated"] == 7


def _load_as_a_user(dirs, cwd, **env):
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AS_A_USER, *dirs],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": "", **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout)


def test_the_triton_decode_path_matches_in_the_interpreter(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    dirs = []
    for family in ("llama", "phi3", "gpt2"):  # SwiGLU; fused gate_up; Conv1D with biases
        _export_tiny(family, tmp_path / family, tokenizer)
        dirs.append(str(tmp_path / family))
    results = _load_as_a_user(dirs, tmp_path, LTE_FORCE_TRITON="1", TRITON_INTERPRET="1")
    for directory in dirs:
        r = results[directory]
        assert r["triton_path"], directory
        assert r["token"] < 1e-5 and r["few"] < 1e-5 and r["decode"] < 1e-4 and r["sparse"] < 1e-5, (directory, r)


def test_the_pure_torch_decode_path_matches_without_the_kernel():
    import lte.export.remote.modeling_lte as modeling

    assert modeling._cpu_kernel_available is None  # the package copy has no kernel beside it: pure torch
    for family in ("llama", "phi3", "gpt2"):
        model = tiny_model(family)
        inject_lte(model, LTEModelConfig(expert_size=8, router_init="centroid"), progress=False)
        set_lte_routing(model, "hard")
        for layer in lte_layers(model):
            layer.threshold = 0.5
        ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full = model(ids).logits[0, -1]
            to_routed(model, [0.5, 0.5])
            past = model(ids[:, :-1], use_cache=True).past_key_values
            step = model(ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_a_few_tokens_run_the_union_of_their_experts_through_the_cpu_kernel(monkeypatch):
    import lte.export.remote.modeling_lte as modeling
    import lte_kernels.cpu as cpu_kernel

    calls = []

    def spy(h, weight_t, order, count, size):
        calls.append((h.shape, int(count)))
        return cpu_kernel.slot_matvec_t(h, weight_t, order, count, size)

    monkeypatch.setattr(modeling, "_cpu_kernel_available", cpu_kernel.available, raising=False)
    monkeypatch.setattr(modeling, "_cpu_select", cpu_kernel.select_experts, raising=False)
    monkeypatch.setattr(modeling, "_cpu_matvec", cpu_kernel.slot_matvec, raising=False)
    monkeypatch.setattr(modeling, "_cpu_matvec_t", spy, raising=False)
    for family in ("llama", "gpt2"):
        model = tiny_model(family)
        inject_lte(model, LTEModelConfig(expert_size=8, router_init="centroid"), progress=False)
        set_lte_routing(model, "hard")
        ids = torch.randint(0, 64, (2, 2), generator=torch.Generator().manual_seed(3))
        thresholds = calibrate(model, [{"input_ids": ids}], [0.8, 0.8], progress=False)  # few experts per token
        with torch.no_grad():
            want = model(ids).logits
            to_routed(model, thresholds)
            calls.clear()
            got = model(ids).logits
        # one kernel call per layer for all 4 tokens, over a non-empty union of experts that is not all of them
        assert len(calls) == 2 and all(shape[:-1].numel() == 4 and 0 < count < 8 for shape, count in calls), (
            family,
            calls,
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exported_weights_are_expert_contiguous(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    _export_tiny("llama", tmp_path / "llama", AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K"))
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    routers = load_file(tmp_path / "llama" / "lte" / "routers.safetensors")
    prefix = "model.layers.0.mlp."
    assert weights[prefix + "gate_proj.weight"].shape == (64, 32)  # [neurons, hidden]: expert e = rows e*8..e*8+7
    assert weights[prefix + "down_proj.weight"].shape == (32, 64)  # the base class's layout: expert e = columns e*8..
    assert routers[prefix + "gate_proj.router.weight"].shape == (8, 32)
    assert not any("weight_t" in k for k in weights)
    assert not any("router" in k for k in weights)  # format 2: the routers are in their own file
    assert set(routers) == {f"model.layers.{i}.mlp.gate_proj.router.weight" for i in range(2)}
    assert (tmp_path / "llama" / "lte_kernels_cpu.py").is_file()


# ---- threshold tuning on the smoke-trained stories260K run ----


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The smoke run's stage-2 model, its calibration batches and its held-out data."""
    from lte.model.inject import load_lte
    from lte.training.config import load_run_recipe
    from lte.training.data import build_data
    from lte.training.loading import calibration_batches, collator_for, load_tokenizer

    out, _ = tiny_run
    recipe = load_run_recipe(out)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    model = load_lte(out / "stage2" / "model").eval()
    return model, calibration_batches(data, tokenizer, 8192, 16), data, collator_for(data, tokenizer)


@pytest.fixture
def stage2(trained):
    """``trained`` with every threshold back at the trained value (lte.threshold)."""
    model = trained[0]
    for layer in lte_layers(model):
        layer.threshold = layer.trained_threshold
    return trained


@pytest.fixture(scope="module")
def stage2_sensitivity(trained):
    model = trained[0]
    for layer in lte_layers(model):
        layer.threshold = layer.trained_threshold
    return sensitivity(model, trained[1], progress=False)


@pytest.mark.parametrize("allocation", ["uniform", "tuned"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_held_out_sparsity_is_within_two_points_of_the_target(stage2, stage2_sensitivity, target, allocation):
    from lte.training.evaluate import evaluate_lm

    model, batches, data, collator = stage2
    n = len(lte_layers(model))
    targets = [target] * n if allocation == "uniform" else allocate(stage2_sensitivity, target)
    chosen = evaluate_allocation(model, batches, allocation, targets, progress=False)
    assert chosen.sparsity == pytest.approx(target, abs=0.01)  # calibration: exact up to ties
    held_out = evaluate_lm(model, data.eval, collator, 16)
    assert held_out.sparsity == pytest.approx(target, abs=0.02)


def test_tuned_allocation_is_no_worse_than_uniform_on_calibration(stage2):
    model, batches, _, _ = stage2
    sens = sensitivity(model, batches, progress=False)
    assert sens.costs.shape == (5, len(sens.grid)) and (sens.costs[:, -1] > 0.05).all()  # 95% sparse: a clear loss
    assert sens.trained == pytest.approx(
        evaluate_batches(model, batches).per_layer_sparsity
    )  # thresholds restored afterwards
    for target in (0.5, 0.7):
        n = len(lte_layers(model))
        uniform = evaluate_allocation(model, batches, "uniform", [target] * n, progress=False)
        targets = allocate(sens, target)
        assert sum(targets) / n == pytest.approx(target, abs=0.005)
        tuned = evaluate_allocation(model, batches, "tuned", targets, progress=False)
        assert tuned.sparsity == pytest.approx(target, abs=0.01)
        assert tuned.nll <= uniform.nll + 1e-6, (target, tuned, uniform)


def test_negative_thresholds_run_every_expert(stage2):
    model, batches, _, _ = stage2
    calibrate(model, batches, [0.0] * 5, progress=False)
    per_layer = evaluate_batches(model, batches[:1]).per_layer_sparsity
    assert per_layer == [0.0] * 5
    assert all(layer.threshold == KEEP_ALL for layer in lte_layers(model))


def test_allocate_spends_the_budget_where_it_is_cheap():
    grid = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    cheap = [0.001 * s for s in grid]
    costly = [1.0 * s * s for s in grid]
    targets = allocate(Sensitivity(grid, np.array([cheap, costly]), trained=[0.0, 0.0]), 0.5)
    assert sum(targets) == pytest.approx(1.0)
    assert targets[0] > 0.9 and targets[1] < 0.1
    # a layer's trained point costs nothing: at the trained mean, the trained allocation comes back
    bowl = [[(s - t) ** 2 for s in grid] for t in (0.3, 0.7)]
    assert allocate(Sensitivity(grid, np.array(bowl), trained=[0.33, 0.67]), 0.5) == [0.33, 0.67]


# ---- the export stage of the smoke run, `lte generate`, bad input ----


def test_the_main_job_ends_with_an_export(tiny_run):
    out, proc = tiny_run
    report = json.loads((out / "export" / "lte_export.json").read_text())
    for key in (
        "target_sparsity",
        "calibration_sparsity",
        "heldout_sparsity",
        "thresholds",
        "per_layer_sparsity",
        "dense_ppl",
        "sparse_ppl",
        "source_run",
    ):
        assert key in report
    assert report["target_sparsity"] == 0.5
    assert report["calibration_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["heldout_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert len(report["thresholds"]) == len(report["per_layer_sparsity"]) == 5
    assert report["validation_error"] < 1e-4
    assert json.loads((out / "report.json").read_text())["export_dir"] == "export"
    assert (out / "export" / "per_layer_sparsity.png").stat().st_size > 1000
    assert "LTE export written" in proc.stdout


def test_the_export_works_with_pipeline_and_labels_without_the_project(tiny_run, tmp_path):
    out, _ = tiny_run
    proc = subprocess.run(
        [sys.executable, "-c", PIPELINE_AS_A_USER, str(out / "export")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[y/N]" not in proc.stdout + proc.stderr  # nothing asks the user to confirm remote code
    result = _result(proc.stdout)
    assert result["text"].startswith("Once upon a time") and len(result["text"]) > len("Once upon a time") + 20
    assert 0.5 < result["loss"] < 3.0  # a trained TinyStories model on a TinyStories sentence


def test_generate_prints_text_speed_and_sparsity(tiny_run, capsys):
    out, _ = tiny_run
    assert (
        main(
            [
                "generate",
                str(out / "export"),
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "12",
                "--compare-dense",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("Once upon a time") == 2
    assert "tokens/s" in printed and "FFN sparsity" in printed and "x the dense model's tokens/s" in printed
    # what the ratio means on a 64-wide model: its FFNs' share of a token, measured; the kernel on a real FFN
    why = next(line for line in printed.splitlines() if line.strip().startswith("why: one 64x172 FFN takes"))
    share = float(why.split("FFNs are ")[1].split("%")[0])
    assert 0 < share < 100 and "ms routed" in why and "can save at most" in why
    real = next(line for line in printed.splitlines() if "a real model's FFN: the same kernel on" in line)
    assert "TinyLlama-1.1B's 2048x5632" in real and "x the dense FFN" in real and "lte bench kernel --sparsity" in real


def test_bench_decode_times_sparse_against_dense(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    result = tmp_path / "decode.json"
    assert (
        main(["bench", "decode", str(out / "export"), "--new-tokens", "6", "--repeats", "1", "--json", str(result)])
        == 0
    )
    assert "tokens/s" in capsys.readouterr().out
    row = json.loads(result.read_text())
    assert row["new_tokens"] == 6 and row["dense_tokens_per_s"] > 0 and row["sparse_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["sparse_tokens_per_s"] / row["dense_tokens_per_s"])
    assert 0.2 < row["sparsity"] < 0.8


def _fails_with(capsys, argv, *phrases):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, err


def test_bad_input_gets_one_clear_message(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    run = str(out)
    _fails_with(
        capsys,
        ["export", str(tmp_path), "--target-sparsity", "0.5", "--out", str(tmp_path / "x")],
        "has no stage-2 model",
    )
    _fails_with(capsys, ["export", run, "--target-sparsity", "1.5", "--out", str(tmp_path / "x")], "[0, 1)")
    _fails_with(
        capsys,
        [
            "export",
            run,
            "--target-sparsity",
            "0.5",
            "--calibration",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "x"),
        ],
        "file not found",
    )
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat. " * 40)
    _fails_with(
        capsys,
        ["export", run, "--target-sparsity", "0.5", "--calibration", str(short), "--out", str(tmp_path / "x")],
        "fewer than --calibration-tokens",
    )
    _fails_with(capsys, ["export", run, "--target-sparsity", "0.5", "--out", str(out / "export")], "--overwrite")
    _fails_with(capsys, ["generate", str(tmp_path / "nothing")], "no exported model")
    assert not (tmp_path / "x").exists()


def test_max_ppl_increase_exports_the_highest_sparsity_within_the_budget(tiny_run, tmp_path):
    from lte.export.thresholds import choose_thresholds

    out, _ = tiny_run
    request = ExportRequest(
        run_dir=str(out),
        out=str(tmp_path / "budget"),
        max_ppl_increase=10.0,
        calibration_tokens=4096,
        allocation="uniform",
    )
    report = export(request, progress=False)
    limit = report["calibration_dense_ppl"] * 1.10
    assert report["calibration_ppl"] <= limit
    assert report["target_sparsity"] == pytest.approx(report["calibration_sparsity"], abs=1e-3)
    assert 0.05 < report["target_sparsity"] < 0.99
    assert (tmp_path / "budget" / "model.safetensors").is_file()
    # two points more sparsity breaks the budget: the search did not stop early
    trained = _stage2_with_calibration(out, 4096)
    beyond, _ = choose_thresholds(trained[0], trained[1], report["target_sparsity"] + 0.02, "uniform", progress=False)
    assert beyond.ppl > limit


def _stage2_with_calibration(out, tokens):
    from lte.model.inject import load_lte
    from lte.training.config import load_run_recipe
    from lte.training.data import build_data
    from lte.training.loading import calibration_batches, load_tokenizer

    recipe = load_run_recipe(out)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, recipe.seed)
    return load_lte(out / "stage2" / "model").eval(), calibration_batches(data, tokenizer, tokens, 16)


def test_a_failed_export_leaves_the_previous_one_untouched(tiny_run, tmp_path, monkeypatch):
    import lte.export.exporter

    out, _ = tiny_run
    target = tmp_path / "exported"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")
    (target / ".lte-output.json").write_text('{"command": "export"}')  # an earlier export: --overwrite may replace it

    def broken(*args, **kwargs):
        raise RuntimeError("export validation failed (simulated)")

    monkeypatch.setattr(lte.export.exporter, "validate_export", broken)
    request = ExportRequest(
        run_dir=str(out),
        out=str(target),
        target_sparsity=0.4,
        calibration_tokens=2048,
        allocation="uniform",
        overwrite=True,
    )
    with pytest.raises(RuntimeError, match="simulated"):
        export(request, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary directory left behind
    assert (target / "keep.txt").read_text() == "previous export"


def test_a_target_well_below_the_trained_sparsity_is_warned_about(tmp_path):
    from lte.export.exporter import below_trained_sparsity
    from lte.training.loading import load_report

    (tmp_path / "report.json").write_text(json.dumps({"sparsity": 0.694}))
    trained = load_report(tmp_path)["sparsity"]
    warning = below_trained_sparsity(trained, 0.5)
    assert "trained at 69.4% FFN sparsity" in warning and "at 50.0%" in warning
    assert below_trained_sparsity(trained, 0.65) is None  # within five points
    assert below_trained_sparsity(trained, 0.9) is None  # above: raising thresholds is what export tuning is for
    assert load_report(tmp_path / "no-run") == {}
    assert below_trained_sparsity(None, 0.1) is None  # no report: nothing to compare with


def test_the_export_initialises_non_persistent_buffers_as_the_base_class_does(tmp_path):
    # FalconH1's mup_vector: a non-persistent buffer (never in a checkpoint) computed from the config
    # in __init__ and _init_weights. Its FFN calls up_proj before gate_proj: "first" is in call order.
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lte.export.remote.modeling_lte import install_routed_ffns

    config = transformers.FalconH1Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=16,
        mamba_expand=1,
        ssm_multipliers=[0.5, 2.0, 3.0, 0.25, 1.5],
    )
    torch.manual_seed(0)
    model = transformers.FalconH1ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    config.lte_ffn = {
        "expert_size": 8,
        "router_bias": False,
        "hosts": [
            {
                "path": f"model.layers.{i}.feed_forward",
                "first": ["up_proj", "gate_proj"],
                "down": "down_proj",
                "fused_chunks": 1,
            }
            for i in range(2)
        ],
    }
    config.lte_thresholds, config.lte_routing, config.lte_track_sparsity = [0.5, 0.5], "hard", False
    install_routed_ffns(model, config)
    write_checkpoint(
        model, AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K"), tmp_path, "FalconH1ForCausalLM"
    )
    base = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    buffers = dict(exported.named_buffers())
    assert {n for n, _ in base.named_buffers()} == set(buffers)
    for name, buffer in base.named_buffers():
        torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)
    assert not torch.equal(
        buffers["model.layers.0.mamba.mup_vector"], torch.ones_like(buffers["model.layers.0.mamba.mup_vector"])
    )
    exported.config.lte_routing = "dense"
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base(ids).logits, want, atol=1e-5, rtol=1e-5)


def _validation_case(tmp_path):
    from transformers import AutoTokenizer

    directory = tmp_path / "llama"
    _export_tiny("llama", directory, AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K"))
    d = torch.load(directory / "expected.pt")
    return directory, [{"input_ids": d["ids"]}], [d["sparse"]]


def test_export_validation_fails_on_non_finite_logits_and_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from lte.export.exporter import validate_export

    directory, inputs, expected = _validation_case(tmp_path)
    assert validate_export(directory, inputs, expected, torch.float32, torch.device("cpu")) < 1e-5
    broken = expected[0].clone()
    broken[0, 0, 0] = float("nan")  # max(worst, nan) kept the worst error: a NaN passed
    with pytest.raises(RuntimeError, match="trained model's logits on validation input 0 hold NaN or inf"):
        validate_export(directory, inputs, [broken], torch.float32, torch.device("cpu"))
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"1 weight\(s\) hold NaN or inf \(model.layers.1.mlp.up_proj.weight\)"):
        validate_export(directory, inputs, expected, torch.float32, torch.device("cpu"))


def test_an_export_written_before_the_routing_rename_still_loads(tmp_path):
    """config.json of an older export says lte_mode="sparse": it loads as lte_routing="hard", and
    config.lte_mode still switches it, each with a warning naming the new key."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _export_tiny("llama", tmp_path / "old", AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K"))
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("lte_routing") == "hard"
    path.write_text(json.dumps({**config, "lte_mode": "sparse"}))
    expected = torch.load(tmp_path / "old" / "expected.pt")
    with pytest.warns(DeprecationWarning, match="use config.lte_routing"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "old", trust_remote_code=True).eval()
    assert model.config.lte_routing == "hard"
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"]).logits, expected["sparse"], atol=1e-5, rtol=1e-5)
        with pytest.warns(DeprecationWarning, match="use config.lte_routing"):
            model.config.lte_mode = "dense"
        assert model.config.lte_routing == "dense"
        torch.testing.assert_close(model(expected["ids"]).logits, expected["dense"], atol=1e-5, rtol=1e-5)
    model.config.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["lte_routing"] == "dense" and "lte_mode" not in resaved


def test_tools_switch_the_routing_of_an_export_with_the_old_remote_code():
    """An older export carries remote code that reads config.lte_mode; generate and bench set that key for it."""
    from types import SimpleNamespace

    from lte.tools.bench import set_export_routing

    old, new = SimpleNamespace(lte_mode="sparse"), SimpleNamespace(lte_routing="hard")
    assert set_export_routing(old, "dense") == "hard" and old.lte_mode == "dense"
    assert set_export_routing(old, "hard") == "dense" and old.lte_mode == "sparse"
    assert set_export_routing(new, "dense") == "hard" and new.lte_routing == "dense" and not hasattr(new, "lte_mode")
