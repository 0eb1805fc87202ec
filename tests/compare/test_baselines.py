"""The baseline methods as restorable transforms, and `lte compare` end to end."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, STORIES, tiny_model
from lte.compare.baselines import METHODS, dense_ffn_flops_per_token, ffn_sites
from lte.compare.baselines.griffin import select
from moe_configs import MOE_CONFIGS, tiny_moe

SPARSE = [m for m in METHODS if m != "dense"]
L, PREFIX = 24, 12


def batches(n=4, seed=0, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, L), generator=generator)} for _ in range(n)]


def apply(method, model, target, calibration, **kwargs):
    if method == "moefication":
        kwargs.setdefault("expert_size", 8)
    handle = METHODS[method](model, target, calibration, **kwargs)
    handle.prefix = PREFIX
    return handle


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", SPARSE)
def test_each_method_is_exact_at_zero_sparsity_sparse_at_half_and_removable(method, family):
    model = tiny_model(family)
    calibration, x = batches(), batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        dense = model(x).logits
        handle = apply(method, model, 0.0, calibration)
        if (method, family) == ("sparse_expansion", "opt"):
            # SparseGPT zeroes the weights of inputs that were never active in calibration (dead ReLU
            # neurons feeding fc2), as the reference code does; new tokens can activate them
            model(x)
            assert 0 < max(handle.per_layer_sparsity()) < 0.25
        else:
            torch.testing.assert_close(model(x).logits, dense)  # nothing removed at sparsity 0
            assert max(handle.per_layer_sparsity()) == 0
        handle.remove()
        handle = apply(method, model, 0.5, calibration)
        sparse = model(x).logits
        with handle.disabled():
            torch.testing.assert_close(model(x).logits, dense)  # the reference path is the dense model
        handle.remove()
        torch.testing.assert_close(model(x).logits, dense)  # remove() restores the model
    if (method, family) == ("cats", "opt"):  # ReLU already zeroes about half the neurons: CATS at 50% drops only zeros
        torch.testing.assert_close(sparse, dense, atol=1e-3, rtol=0)
    else:
        assert not torch.allclose(sparse[:, PREFIX:], dense[:, PREFIX:], atol=1e-4)
    realized = handle.per_layer_sparsity()
    assert len(realized) == 2 and all(0.3 < s < 0.7 for s in realized), realized
    if method == "griffin":  # the prompt runs dense: its logits are exact
        torch.testing.assert_close(sparse[:, :PREFIX], dense[:, :PREFIX])


def test_calibrated_thresholds_hit_the_target_where_the_inputs_are_the_calibration_ones():
    """The first FFN's input (TEAL) and gate activation (CATS) are what calibration saw, so their
    sparsity is the target there. (TEAL's down-projection input is not: sparsifying the FFN input
    shifts it, which is why TEAL's realised sparsity differs from its target.)"""
    model = tiny_model("llama")
    calibration = batches(8)
    with torch.no_grad():
        for method, measured in (("teal", "per_layer_input_sparsity"), ("cats", "per_layer_sparsity")):
            handle = apply(method, model, 0.7, calibration)
            handle.prefix = 0
            for batch in calibration:
                model(batch["input_ids"])
            assert getattr(handle, measured)()[0] == pytest.approx(0.7, abs=0.01), method
            handle.remove()


def test_sequential_teal_hits_its_target_in_every_layer_and_dense_calibration_overshoots():
    model = tiny_model("llama")
    calibration = batches(8)
    with torch.no_grad():
        realized = {}
        for sequential in (True, False):
            handle = METHODS["teal"](model, 0.7, calibration, sequential=sequential)
            for batch in calibration:
                model(batch["input_ids"])
            realized[sequential] = handle.per_layer_sparsity()
            handle.remove()
    assert realized[True] == pytest.approx([0.7, 0.7], abs=0.01)
    assert min(realized[False]) > 0.72  # thresholds from dense activations zero more once the input is sparse


def test_exact_budgets_for_top_k_methods():
    model = tiny_model("llama")  # width 64: GRIFFIN keeps int(64 * 0.25) = 16; MoEfication 8 experts of 8 -> 2
    with torch.no_grad():
        for method, expected in (("griffin", 1 - 16 / 64), ("moefication", 1 - 2 / 8)):
            handle = apply(method, model, 0.75, batches())
            for batch in batches(2, seed=5):
                model(batch["input_ids"])
            assert handle.per_layer_sparsity() == pytest.approx([expected] * 2), method
            handle.remove()


def test_griffin_selects_by_the_norm_of_token_normalised_activations():
    z = torch.tensor([[[10.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])  # 3 prompt tokens, 3 neurons
    # Neuron 0 has the largest raw magnitude but one token; neuron 1 carries most of the normalised energy.
    assert select(z, 1).tolist() == [[False, True, False]]
    assert select(z, 2).tolist() == [[True, True, False]]
    assert select(z, 0).sum() == 0


def test_flops_accounting():
    model = tiny_model("llama")
    sites = ffn_sites(model)
    unit = 2 * 32 * 64
    assert dense_ffn_flops_per_token(sites) == 2 * 3 * unit
    with torch.no_grad():
        cats = apply("cats", model, 0.5, batches(8))
        nonzero = [[0, 0] for _ in sites]  # what reached each down projection, counted apart from the handle

        def count(module, args, layer):
            z = args[0][:, PREFIX:]
            nonzero[layer][0] += int((z != 0).sum())
            nonzero[layer][1] += z.numel()

        probes = [site.down.register_forward_pre_hook(lambda m, a, i=site.index: count(m, a, i)) for site in sites]
        for batch in batches(8):
            model(batch["input_ids"])
        for probe in probes:
            probe.remove()
        keep = [n / total for n, total in nonzero]
        assert min(keep) > 0.3 and max(keep) < 0.7
        assert cats.ffn_flops_per_token() == pytest.approx(sum(unit * (1 + 2 * k) for k in keep))  # whole gate computed
        cats.remove()
        griffin = apply("griffin", model, 0.5, None)
        model(batches(1)[0]["input_ids"])
        assert griffin.ffn_flops_per_token() == pytest.approx(2 * 3 * unit * 0.5)
        griffin.remove()


def lte_compare(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lte", "compare", "--model", str(STORIES), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_compare_end_to_end_with_lte_and_every_baseline(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "cmp"
    proc = lte_compare(
        "--lte",
        str(run),
        "--data",
        str(REPO / "assets" / "tinystories" / "eval.txt"),
        "--methods",
        "dense,lte,griffin,teal,teal_all,cats,moefication,sparse_expansion",
        "--sparsity",
        "0.5,0.7",
        "--calibration-tokens",
        "2048",
        "--max-eval-tokens",
        "4096",
        "--allocation",
        "uniform",
        "--tasks",
        "piqa,boolq",
        "--task-dir",
        str(REPO / "tests" / "data" / "tasks" / "layouts"),
        "--task-limit",
        "6",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["target_sparsity"]): r for r in results["rows"]}
    assert len(rows) == 1 + 7 * 2 and not any(r.get("skipped") for r in rows.values())
    dense = rows[("dense", 0.0)]
    assert dense["kl"] == 0 and dense["realized_sparsity"] == 0
    assert dense["ffn_flops_per_token"] == results["settings"]["dense_ffn_flops_per_token"]
    for (method, target), row in rows.items():
        assert row["scored_tokens"] == dense["scored_tokens"]  # every method scored on the same tokens
        if method == "dense":
            continue
        assert row["kl"] > 0 and row["ppl"] > dense["ppl"] and row["ffn_flops_per_token"] < dense["ffn_flops_per_token"]
        tolerance = 0.1 if method == "teal_all" else 0.03  # teal_all: FFN thresholds set before attention is sparse
        assert abs(row["realized_sparsity"] - target) < tolerance, (method, target, row["realized_sparsity"])
    for method in ("lte", "griffin", "teal", "cats", "moefication", "sparse_expansion"):
        assert rows[(method, 0.7)]["ppl"] > rows[(method, 0.5)]["ppl"]  # more sparsity costs quality
    for row in rows.values():  # zero-shot accuracy with each method's sparsity in place
        assert set(row["tasks"]) == {"piqa", "boolq"}
        assert all(t["examples"] == 6 and 0 <= t["acc"] <= 1 for t in row["tasks"].values())
    assert (out / "sparsity_vs_ppl.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| lte | 0.50 |" in table and "| piqa acc | boolq acc |" in table


def test_compare_reports_skipped_methods_and_rejects_bad_input(tmp_path):
    data = str(REPO / "assets" / "tinystories" / "eval.txt")
    out = tmp_path / "cmp"
    proc = lte_compare(
        "--data",
        data,
        "--methods",
        "dense,lte,griffin",
        "--sparsity",
        "0.5",
        "--calibration-tokens",
        "1024",
        "--max-eval-tokens",
        "2048",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "lte", "griffin"]
    assert rows[1]["skipped"] == "no --lte RUN_OR_EXPORT_DIR given" and "ppl" not in rows[1]
    before = (out / "results.json").read_bytes()
    for args, message in (
        (["--methods", "dense,deja_vu"], "unknown method(s) deja_vu"),
        (["--sparsity", "1.5"], "--sparsity 1.5 must lie in [0, 1)"),
        ([], "exists; pass --overwrite"),
        (["--sparsity", "half"], "expected comma-separated numbers"),
    ):
        bad = lte_compare("--data", data, "--out", str(out), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert (out / "results.json").read_bytes() == before  # a rejected run leaves the old results alone


def test_sparsegpt_reconstructs_better_than_magnitude_pruning_and_respects_n_m():
    from lte.compare.baselines.sparsegpt import prune

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=generator) @ torch.randn(48, 48, generator=generator)  # correlated inputs
    w = torch.randn(32, 48, generator=generator)
    h = x.T @ x
    torch.testing.assert_close(prune(w, h, sparsity=0.0), w)  # nothing to prune: unchanged
    pruned = prune(w, h, sparsity=0.5, block_size=16)
    assert float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    magnitude = w * (w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    error = lambda v: float(((x @ (w - v).T) ** 2).sum())  # noqa: E731
    assert error(pruned) < 0.8 * error(magnitude)  # measured 0.66x here
    assert error(pruned) < 0.8 * error(w * (pruned != 0))  # the weight updates, not just the mask, pay off
    two_four = prune(w, h, n_m=(2, 4), block_size=16)
    assert ((two_four.reshape(32, 12, 4) == 0).sum(-1) == 2).all()  # exactly 2 of every 4 (no dead inputs here)
    with pytest.raises(ValueError, match="multiple of M"):
        prune(w, h, n_m=(2, 4), block_size=18)


def test_sparse_expansion_routes_tokens_to_cluster_copies():
    model = tiny_model("llama")
    calibration, x = batches(8), batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        one = apply("sparse_expansion", model, 0.5, calibration, clusters=1)
        single = model(x).logits
        one.remove()
        four = apply("sparse_expansion", model, 0.5, calibration, clusters=4)
        routed = model(x).logits
        assert four.per_layer_sparsity() == pytest.approx([0.5, 0.5], abs=0.02)  # weight sparsity of the copies run
        four.remove()
    assert not torch.allclose(single, routed, atol=1e-4)  # different copies for different tokens


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_methods_inside_routed_experts_count_over_the_selected_pairs_and_restore_the_model(family):
    """TEAL and CATS inside routed experts: one threshold per MoE layer over the (token, selected expert)
    pairs, exact at 0, at the target where the scored tokens are the calibration ones, the dense
    reference while disabled, and the model (its experts implementation too) as it was after remove()."""
    model = tiny_moe(family)
    sites = ffn_sites(model)
    routed = [site for site in sites if site.experts is not None]
    assert len(routed) == 2 and all(site.top_k == 2 for site in routed)
    gated = 3 * 2 * 32 * 16  # gate, up, down of one 32 x 16 expert
    assert dense_ffn_flops_per_token(sites) == 2 * 2 * gated + (2 * 3 * 2 * 32 * 48 if family == "qwen2_moe" else 0)
    calibration = batches(2)
    implementation = model.config._experts_implementation
    with torch.no_grad():
        dense = [model(**b).logits for b in calibration]
        for method in ("teal", "cats", "griffin", "moefication", "sparse_expansion"):
            if method in ("griffin", "moefication", "sparse_expansion"):
                with pytest.raises(ValueError, match="defined on dense FFNs only"):
                    apply(method, model, 0.5, calibration)
                continue
            if (method, family) == ("cats", "gpt_oss"):  # a clamped activation over biased gate rows
                with pytest.raises(ValueError, match="activation module"):
                    apply(method, model, 0.5, calibration)
                for site in routed:  # an activation, still biased gate rows
                    site.host.act_fn = torch.nn.SiLU()
                with pytest.raises(ValueError, match="no plain activation of the gate"):
                    apply(method, model, 0.5, calibration)
                for site in routed:
                    del site.host.act_fn
                assert model.config._experts_implementation == implementation  # the failed calibration undid it
                continue
            handle = apply(method, model, 0.0, calibration)
            torch.testing.assert_close(model(**calibration[0]).logits, dense[0], atol=1e-5, rtol=0)
            handle.remove()
            handle = apply(method, model, 0.5, calibration)
            handle.prefix = 0
            sparse = [model(**b).logits for b in calibration]
            handle.reset()
            handle.prefix = PREFIX
            model(**calibration[0])  # counted: the (token, expert) pairs of the positions after the prompt
            assert [int(handle._count[site.index]) for site in routed] == [2 * (L - PREFIX) * 2] * 2
            with handle.disabled():
                torch.testing.assert_close(model(**calibration[0]).logits, dense[0])
            handle.remove()
            assert model.config._experts_implementation == implementation
            torch.testing.assert_close(model(**calibration[0]).logits, dense[0])
            assert not torch.allclose(sparse[0], dense[0], atol=1e-4)
            realized = [handle.per_layer_sparsity()[site.index] for site in routed]
            # CATS's thresholds are the calibration quantiles of these very pairs; TEAL's z quantile is taken
            # with its input threshold in place: both land on the target
            assert all(abs(s - 0.5) < 0.03 for s in realized), (method, realized)
            kept = handle.ffn_flops_per_token() - handle.router_flops
            assert 0.3 * dense_ffn_flops_per_token(sites) < kept < 0.8 * dense_ffn_flops_per_token(sites)


def test_pair_taps_inside_routed_experts_sample_at_one_stride_over_all_pairs():
    """collect's down-projection inputs of routed experts: a row per (token, selected expert) pair, in the
    order the experts ran; under a budget, every stride-th of those rows across all calls (experts, batches)."""
    from lte.compare.baselines.sites import collect

    model = tiny_moe("qwen3_moe")
    calibration = batches(3)
    tokens = sum(b["input_ids"].numel() for b in calibration)
    full = collect(model, calibration, {"z": None})["z"]
    sampled = collect(model, calibration, {"z": None}, max_tokens=tokens // 3)["z"]
    assert [z.shape[0] for z in full] == [2 * tokens] * 2  # top-2: two rows per token
    for every, some in zip(full, sampled, strict=True):
        torch.testing.assert_close(some, every[::3])
