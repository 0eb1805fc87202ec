"""The generated coverage test: every causal-LM architecture of the installed transformers.

One run (``lte.tools.coverage.run_coverage``) shared by the tests below: a tiny random model per
architecture through detection, grouping, both training stages, export, and a reload in a
process that cannot import ``lte``. docs/architectures.md is this run's table.
"""

import json
import math
import re
import warnings

import pytest

from conftest import REPO, STORIES
from lte.tools.coverage import (
    FAILED,
    NOT_BUILT,
    REFUSED,
    WORKS,
    Outcome,
    architectures,
    compare_expected,
    render_markdown,
    run_coverage,
)

EXPECTED = REPO / "tests" / "model" / "architectures_expected.json"

# Dense decoders that the hand-written registry refused (the list of issue 16), the nine
# families it knew, and MoE models: detection must handle all without registration.
FORMERLY_REFUSED = [
    "olmo",
    "olmo2",
    "olmo3",
    "granite",
    "stablelm",
    "falcon",
    "gptj",
    "bloom",
    "phi",
    "starcoder2",
    "cohere",
    "smollm3",
    "gpt_bigcode",
    "codegen",
    "exaone4",
    "gpt_neo",
    "glm4",
    "nemotron",
    "arcee",
    "ministral",
    "helium",
    "seed_oss",
    "mpt",
    "gemma2",
    "gemma3_text",
]
FORMER_NINE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
# Their export's reload once broke on the base's conventions: sarvam_moe's config runs Glm4MoeForCausalLM,
# laguna's weight rename is not idempotent, MiniMax keeps a cache of its own.
MOE_ALIASES = ["sarvam_moe", "laguna", "minimax"]


@pytest.fixture(scope="module")
def coverage(tmp_path_factory):
    return {o.model_type: o for o in run_coverage(STORIES, workdir=tmp_path_factory.mktemp("architectures"))}


def test_every_architecture_works_or_is_refused_with_a_reason(coverage):
    assert sorted(coverage) == sorted(architectures())
    assert {t: o.reason for t, o in coverage.items() if o.status == FAILED} == {}  # a failure is a bug
    for o in coverage.values():
        assert o.status in (WORKS, REFUSED, NOT_BUILT)
        if o.status == WORKS:
            assert o.dense_error <= 1e-5 and o.export_error <= 1e-3 and o.layout
            assert all(math.isfinite(loss) for losses in o.stages.values() for loss in losses) and len(o.stages) == 2
        else:
            assert o.reason and "Traceback" not in o.reason
        if o.status == REFUSED:
            assert "register_ffn" not in o.reason
    assert sum(o.status == WORKS for o in coverage.values()) >= 60


def test_dense_decoders_work_without_registration(coverage):
    assert {t: coverage[t].status for t in FORMERLY_REFUSED + FORMER_NINE} == dict.fromkeys(
        FORMERLY_REFUSED + FORMER_NINE, WORKS
    )


def test_moe_models_route_inside_their_experts(coverage):
    """Routed experts in transformers' fused experts modules train and export (lte/model/experts.py)."""
    for model_type in MOE + MOE_ALIASES:
        assert coverage[model_type].status == WORKS, (model_type, coverage[model_type].reason)
        assert "routed experts: " in coverage[model_type].layout


def test_expectations_fail_regressions_and_report_new_types(monkeypatch):
    import transformers

    expected = {
        "transformers": "5.24.0",
        "architectures": {
            "llama": {"status": WORKS, "reason": ""},
            "dbrx": {"status": NOT_BUILT, "reason": "AttributeError"},
            "gone": {"status": WORKS, "reason": ""},
        },
    }
    run = [
        Outcome("llama", "LlamaForCausalLM", REFUSED, "no FFN found in LlamaForCausalLM: ..."),
        Outcome("dbrx", "DbrxForCausalLM", WORKS),
        Outcome("brand_new", "BrandNewForCausalLM", WORKS),
    ]
    monkeypatch.setattr(transformers, "__version__", "5.99.0")  # another version: only works -> other fails
    regressions, notes = compare_expected(run, expected)
    assert regressions == ["llama: expected works, got refused: no FFN found in LlamaForCausalLM: ..."]
    assert notes == [
        "dbrx: expected not built, got works",
        "new: brand_new works",
        "not in transformers 5.99.0: gone",
    ]
    monkeypatch.setattr(transformers, "__version__", "5.24.0")  # the expectations' version: every change fails
    regressions, notes = compare_expected(run, expected)
    assert regressions[1:] == ["dbrx: expected not built, got works"] and notes[0] == "new: brand_new works"
    assert compare_expected(run[1:2], {**expected, "architectures": {}})[0] == []  # unknown types never fail


def test_no_row_regresses_against_the_expectations(coverage):
    """A row that worked must still work; on the expectations' transformers every status must
    match. A newer transformers' new model types are reported, not failed."""
    expected = json.loads(EXPECTED.read_text())
    regressions, notes = compare_expected(list(coverage.values()), expected)
    for note in notes:
        warnings.warn(f"architecture coverage against transformers {expected['transformers']}: {note}", stacklevel=1)
    assert regressions == [], (
        "architecture rows changed against tests/model/architectures_expected.json:\n"
        + "\n".join(regressions)
        + "\nfix the regression, or (an intended change) rerun `python scripts/architectures.py`"
    )


def test_the_architecture_table_is_up_to_date(coverage):
    import transformers

    table = (REPO / "docs" / "architectures.md").read_text()
    generated_with = re.search(r"installed\s+transformers \(([^)]+)\)", table).group(1)
    if transformers.__version__ != generated_with:
        # The table is a measurement of one transformers version: another version is compared through
        # the expectations (test above), not diffed row by row.
        pytest.skip(
            f"docs/architectures.md was generated with transformers {generated_with}, and {transformers.__version__} "
            "is installed: `make install` pins the table's version (constraints.txt); after moving the pin, run "
            "`python scripts/architectures.py`"
        )
    assert table == render_markdown(list(coverage.values())), (
        "docs/architectures.md is out of date: run `python scripts/architectures.py`"
    )
