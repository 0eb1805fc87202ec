"""Runs trained for a target: the `target_sparsity` recipe key, `reuse_from` (shared stage 0 and
prepare step), and `lte compare` with one LTE run per target and more held-out sources."""

import json
import os

import pytest
from omegaconf import OmegaConf

from conftest import FAST, REPO, STORIES, run_train
from lte.cli import main
from lte.compare.harness import CompareRequest, compare
from lte.core.errors import UsageError
from lte.pipeline import reused_stages
from lte.training.config import load_recipe

DATA = REPO / "assets" / "tinystories" / "eval.txt"


@pytest.fixture(scope="module")
def second_run(tiny_run, tmp_path_factory):
    """A tiny run trained and exported for 0.7 that takes the first tiny run's prepare step."""
    first, _ = tiny_run
    out = tmp_path_factory.mktemp("second") / "run"
    return out, run_train(out, f"reuse_from={first}", "target_sparsity=0.7")


def targets(*args):
    recipe = load_recipe([*args, "output_dir=runs/x"], check_hardware=False)
    return recipe.lte.target_sparsity, recipe.export.target_sparsity


def test_target_sparsity_sets_the_controller_and_the_export_where_they_are_not_set_beside_it(tmp_path):
    assert targets("recipe=tiny") == (0.52, 0.5)  # the recipe file's own values
    assert targets("recipe=tiny", "target_sparsity=0.7") == (0.7, 0.7)
    assert targets("recipe=tinystories_llama", "target_sparsity=0.5") == (0.5, 0.5)
    assert targets("recipe=tiny", "target_sparsity=0.7", "lte.target_sparsity=0.72") == (0.72, 0.7)
    # in a recipe file the key fills what the file leaves unset; the command line still overrides
    cfg = OmegaConf.load(REPO / "recipes" / "tiny.yaml")
    del cfg.lte["target_sparsity"], cfg.export["target_sparsity"]
    cfg.target_sparsity = 0.6
    path = tmp_path / "mine.yaml"
    OmegaConf.save(cfg, path)
    assert targets(f"recipe={path}") == (0.6, 0.6)
    assert targets(f"recipe={path}", "export.target_sparsity=0.5") == (0.6, 0.5)
    assert targets(f"recipe={path}", "target_sparsity=0.8") == (0.8, 0.8)
    for bad, message in (
        ("target_sparsity=1.5", "target_sparsity=1.5 must lie in (0, 1)"),
        ("target_sparsity=most", "target_sparsity='most' must be a number"),
    ):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            targets("recipe=tiny", bad)


def test_a_run_trained_for_a_target_takes_the_prepare_step_of_another(tiny_run, second_run):
    (first, _), (second, proc) = tiny_run, second_run
    assert f"prepare: reused {first}/prepare/model" in proc.stderr
    for name in ("model.safetensors", "lte_routers.safetensors"):
        ours, theirs = second / "prepare" / "model" / name, first / "prepare" / "model" / name
        assert ours.read_bytes() == theirs.read_bytes()
        assert os.stat(ours).st_ino == os.stat(theirs).st_ino  # a hard link: no second copy on disk
    report = json.loads((second / "report.json").read_text())
    assert report["recipe"]["lte"]["target_sparsity"] == report["recipe"]["export"]["target_sparsity"] == 0.7
    assert report["export"]["target_sparsity"] == 0.7
    assert report["export"]["heldout_sparsity"] == pytest.approx(0.7, abs=0.03)
    assert (second / "stage1" / "model" / "lte_routers.safetensors").read_bytes() != (
        first / "stage1" / "model" / "lte_routers.safetensors"
    ).read_bytes()  # stage 1 trained on its own


def test_reuse_refuses_a_run_made_with_other_settings_before_writing_anything(tiny_run, tmp_path, capsys):
    first, _ = tiny_run
    args = ["recipe=tiny", f"output_dir={tmp_path / 'new'}", *FAST, f"reuse_from={first}"]
    assert [here for _, here in reused_stages(load_recipe(args))] == [tmp_path / "new" / "prepare" / "model"]
    with pytest.raises(UsageError, match=r"lte.router_init_steps: 20 there, 10 here"):
        reused_stages(load_recipe([*args, "lte.router_init_steps=10"]))
    with pytest.raises(UsageError, match=r"data.max_train_tokens: 8192 there, 4096 here"):
        reused_stages(load_recipe([*args, "data.max_train_tokens=4096"]))
    # the same through `lte train`: one message, exit code 2, nothing written
    assert main(["train", *args, "lte.expert_size=2"]) == 2
    err = capsys.readouterr().err
    assert f"reuse_from={first}" in err and "lte.expert_size: 4 there, 2 here" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    unfinished = tmp_path / "unfinished"  # a run whose prepare step has not finished
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((first / "recipe.yaml").read_text())
    with pytest.raises(UsageError, match="prepare/model is not finished; finish that run first"):
        reused_stages(load_recipe([*args[:-1], f"reuse_from={unfinished}"]))
    with pytest.raises(UsageError, match="no `lte train` run there"):
        reused_stages(load_recipe([*args[:-1], f"reuse_from={tmp_path}"]))


def run_compare(out, lte, data=DATA, **kwargs):
    request = CompareRequest(
        model=str(STORIES),
        data=str(data),
        calibration=str(DATA),
        out=str(out),
        methods=["dense", "lte"],
        sparsity=[0.5, 0.7],
        lte=lte,
        calibration_tokens=1024,
        max_eval_tokens=2048,
        allocation="uniform",
        **kwargs,
    )
    return {(r["method"], r["target_sparsity"]): r for r in compare(request, progress=False)}


def test_compare_scores_each_target_with_its_own_run_and_on_every_source(tiny_run, second_run, tmp_path):
    (first, _), (second, _) = tiny_run, second_run
    other = tmp_path / "other.txt"  # a second held-out source: TinyStories V1 validation stories after eval.txt's
    other.write_text((REPO / "assets" / "tinystories" / "train_v1_valid.txt").read_text()[:40_000])
    rows = run_compare(tmp_path / "multi", f"0.5={first},0.7={second}", extra_data={"other": other}, layouts=["eos"])
    only_first = run_compare(tmp_path / "first", str(first), data=other)  # same calibration, scored on `other`
    only_second = run_compare(tmp_path / "second", str(second))

    assert [rows[("lte", t)]["run"] for t in (0.5, 0.7)] == [str(first), str(second)]
    # each row's thresholds and scores are those of its own run, tuned on the shared calibration tokens
    assert rows[("lte", 0.5)]["thresholds"] == only_first[("lte", 0.5)]["thresholds"]
    assert rows[("lte", 0.7)]["thresholds"] == only_second[("lte", 0.7)]["thresholds"]
    assert rows[("lte", 0.7)]["thresholds"] != only_first[("lte", 0.7)]["thresholds"]  # the two runs differ
    assert rows[("lte", 0.7)]["ppl"] == pytest.approx(only_second[("lte", 0.7)]["ppl"], rel=1e-6)
    for target in (0.5, 0.7):
        assert rows[("lte", target)]["realized_sparsity"] == pytest.approx(target, abs=0.03)
        assert rows[("lte", target)]["ffn_flops_vs_dense"] < 1
    assert rows[("dense", 0.0)]["ffn_flops_vs_dense"] == 1
    # --extra-data: every row scored on the second source too, the same way as on --data
    dense = rows[("dense", 0.0)]["extra_data"]["other"]
    assert dense["kl"] == 0 and dense["ppl"] == pytest.approx(only_first[("dense", 0.0)]["ppl"], rel=1e-6)
    extra = rows[("lte", 0.5)]["extra_data"]["other"]
    assert extra["ppl"] == pytest.approx(only_first[("lte", 0.5)]["ppl"], rel=1e-6)
    assert extra["kl"] == pytest.approx(only_first[("lte", 0.5)]["kl"], rel=1e-6) and extra["kl"] > 0
    assert extra["scored_tokens"] == dense["scored_tokens"] > 0 and extra["ppl"] != rows[("lte", 0.5)]["ppl"]
    # --layouts eos: the same held-out paragraphs, each after EOS; the same method scored the same way
    eos = rows[("dense", 0.0)]["extra_data"]["eos_doc"]
    # the same number of blocks, minus the markers' positions (one per paragraph, not scored)
    assert eos["kl"] == 0 and 0.8 * rows[("dense", 0.0)]["scored_tokens"] < eos["scored_tokens"]
    assert eos["scored_tokens"] < rows[("dense", 0.0)]["scored_tokens"]
    assert eos["ppl"] != pytest.approx(rows[("dense", 0.0)]["ppl"], rel=1e-3)  # another context, another number
    assert rows[("lte", 0.5)]["extra_data"]["eos_doc"]["kl"] > 0
    assert rows[("lte", 0.5)]["extra_data"]["eos_doc"]["realized_sparsity"] == pytest.approx(0.5, abs=0.05)
    results = json.loads((tmp_path / "multi" / "results.json").read_text())["settings"]
    assert results["layouts"] == {"eos_doc": "--data's paragraphs, each after EOS"}
    assert results["lte_runs"] == {"0.5": str(first), "0.7": str(second)} and results["extra_data"] == {
        "other": str(other)
    }
    table = (tmp_path / "multi" / "results.md").read_text()
    assert (
        "| method | target | run | realized sparsity | ppl | KL to dense | FFN FLOPs/token | FFN FLOPs vs dense "
        "| ppl other | ppl eos_doc |"
    ) in table
    assert f"| lte | 0.50 | {first} |" in table and f"| lte | 0.70 | {second} |" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--lte", "0.5=RUN_A,0.6=RUN_B"],
            "--lte 0.6=RUN_B: 0.6 is not a target of --sparsity 0.5,0.7; add it to --sparsity",
        ),
        (["--lte", "0.5=RUN_A,0.7=missing"], "--lte 0.7=missing: missing: no such run directory"),
        (["--lte", "0.5=RUN_A,half=RUN_B"], "--lte 'half=RUN_B': expected TARGET=RUN_DIR"),
        (["--lte", "0.5=RUN_A"], "--lte has no run for target 0.7 of --sparsity; add TARGET=RUN_DIR"),
        (["--lte", "RUN_A,RUN_B"], "two runs without a target"),
        (["--lte", "0.5=RUN_A,0.5=RUN_B"], "--lte names target 0.5 twice"),
        (["--lte", "RUN_A", "--extra-data", "other"], "--extra-data 'other': expected NAME=FILE"),
        (["--lte", "RUN_A", "--extra-data", "other=missing.txt"], "--extra-data other=missing.txt: file not found"),
        (["--lte", "RUN_A", "--layouts", "eos,after"], "--layouts after: choose from eos, bos"),
        (
            ["--lte", "RUN_A", "--layouts", "eos", "--extra-data", f"eos_doc={DATA}"],
            "--extra-data eos_doc is also the name of a --layouts source",
        ),
    ],
)
def test_compare_rejects_a_bad_lte_or_extra_data_before_any_work(tiny_run, tmp_path, capsys, args, message):
    first, _ = tiny_run
    args = [a.replace("RUN_A", str(first)).replace("RUN_B", str(first)) for a in args]
    message = message.replace("RUN_A", str(first)).replace("RUN_B", str(first))
    out = tmp_path / "cmp"
    assert (
        main(
            ["compare", "--model", str(STORIES), "--data", str(DATA), "--sparsity", "0.5,0.7", "--out", str(out), *args]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_layout_streams_put_each_held_out_paragraph_after_the_marker_and_skip_the_calibration_part():
    from transformers import AutoTokenizer

    from lte.compare.harness import marked_documents, text_end_of_tokens, token_blocks

    tok = AutoTokenizer.from_pretrained(STORIES)
    paragraphs = ["Tom had a red ball.", "Sue saw a big dog.\nIt ran.", "The sun was hot."]
    text = "\n\n".join(paragraphs) + "\n"
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in paragraphs]
    eos, bos = tok.eos_token_id, tok.bos_token_id
    stream, labels = marked_documents(text, tok, eos, 0, 10_000)
    assert stream == [eos, *ids[0], eos, *ids[1], eos, *ids[2]]
    assert labels == [-100, *ids[0], -100, *ids[1], -100, *ids[2]]  # markers are context, not scored
    assert marked_documents(text, tok, bos, 0, 10_000)[0] == [bos, *ids[0], bos, *ids[1], bos, *ids[2]]
    # a paragraph that begins inside the calibration part is left out, the next one is kept
    assert marked_documents(text, tok, eos, len(paragraphs[0]) + 2, 10_000)[0] == [eos, *ids[1], eos, *ids[2]]
    assert marked_documents(text, tok, eos, len(paragraphs[0]) + 3, 10_000)[0] == [eos, *ids[2]]
    assert marked_documents(text, tok, eos, 0, 3)[0] == [eos, *ids[0]]  # stops once it has enough tokens
    # the calibration part ends where compare's stream of --data puts its first n tokens
    whole = DATA.read_text()
    first = token_blocks(whole, tok, 256)[:4].flatten().tolist()
    end = text_end_of_tokens(whole, tok, len(first))
    assert tok(whole[:end], add_special_tokens=False)["input_ids"] == first
    assert text_end_of_tokens(whole, tok, 0) == 0


def test_reuse_takes_stage0_too_when_it_has_steps_and_compares_its_training_settings(tmp_path):
    import yaml

    from lte.pipeline import link_stages

    args = ["recipe=tiny", *FAST, "lte.stage0_steps=2"]
    source = tmp_path / "source"
    (source / "prepare" / "model").mkdir(parents=True)
    (source / "recipe.yaml").write_text(yaml.safe_dump(load_recipe([*args, f"output_dir={source}"]).to_dict()))
    (source / "prepare" / "model" / "config.json").write_text("{}")
    here = tmp_path / "here"
    ours = [
        *args,
        f"output_dir={here}",
        f"reuse_from={source}",
        "target_sparsity=0.9",
        "train.stage1.learning_rate=1e-3",
    ]
    with pytest.raises(UsageError, match="stage0/model is not finished"):
        reused_stages(load_recipe(ours))
    (source / "stage0" / "model").mkdir(parents=True)
    (source / "stage0" / "model" / "config.json").write_text('{"stage": 0}')
    pairs = reused_stages(load_recipe(ours))  # stage 1's settings and the target do not matter
    assert [p[1] for p in pairs] == [here / "stage0" / "model", here / "prepare" / "model"]
    link_stages(pairs)
    assert (here / "stage0" / "model" / "config.json").read_text() == '{"stage": 0}'
    link_stages(pairs)  # a rerun: already there, left alone
    assert reused_stages(load_recipe(ours)) == []  # a rerun with the stages linked: nothing left to take
    other = [*args, f"output_dir={tmp_path / 'other'}", f"reuse_from={source}", "train.learning_rate=1e-3"]
    with pytest.raises(UsageError, match=r"train\.learning_rate: 0\.0001 there, 0\.001 here"):
        reused_stages(load_recipe(other))  # stage 0 trains with it


def test_the_plot_cuts_its_axis_near_dense_and_writes_the_values_above_it():
    from lte.compare.harness import PLOT_CEILING, figure

    def row(method, target, ppl, flops, run=None):
        return {"method": method, "target_sparsity": target, "realized_sparsity": target, "ppl": ppl,
                "ffn_flops_per_token": flops, **({"run": run} if run else {})}  # fmt: skip

    rows = [row("dense", 0.0, 4.0, 100.0), row("lte", 0.5, 4.2, 58.0, "a"), row("lte", 0.9, 5.0, 18.0, "b")]
    rows += [row("teal", 0.5, 6.0, 50.0), row("teal", 0.9, 630.0, 10.0)]
    import matplotlib.pyplot as plt

    fig = figure(rows, "t")
    by_sparsity, by_flops = fig.axes
    for ax in (by_sparsity, by_flops):
        assert ax.get_ylim()[1] == pytest.approx(PLOT_CEILING * 4.0)
        assert [t.get_text() for t in ax.texts if t.get_text() == "630"] == ["630"]  # the point above, written
    assert {t.get_text() for t in by_sparsity.texts} >= {"a", "b"}  # each LTE point names its run
    small = figure(rows[:4], "t")  # nothing above the ceiling: the axis is not cut
    within = small.axes[0]
    assert within.get_ylim()[1] < PLOT_CEILING * 4.0 and not [t for t in within.texts if t.get_text() == "630"]
    plt.close(fig), plt.close(small)
