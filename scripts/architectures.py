"""Run the architecture coverage (lte/tools/coverage.py) and write docs/architectures.md from it.

    HF_HUB_OFFLINE=1 python scripts/architectures.py [--only llama,olmo2] [--json out.json]

Without --only it also writes tests/model/architectures_expected.json (status and short reason per
model type), which tests/model/test_architectures.py compares a run against; the README links the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lte.tools.coverage import expectations, render_markdown, run_coverage, to_json

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests" / "model" / "architectures_expected.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--json", default=None, help="also write every outcome as JSON here")
    parser.add_argument("--out", default=None, help="the table (default: docs/architectures.md, not with --only)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core, at most 2)")
    args = parser.parse_args()
    only = [t for t in args.only.split(",") if t] or None
    out = args.out or (None if only else str(REPO / "docs" / "architectures.md"))
    start = time.perf_counter()
    outcomes = run_coverage(REPO / "assets" / "stories260K", only=only, progress=True, workers=args.workers)
    if out:
        Path(out).write_text(render_markdown(outcomes))
    if not only:  # the expectations the coverage test compares against
        EXPECTED.write_text(json.dumps(expectations(outcomes), indent=1, sort_keys=True) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(outcomes), indent=1) + "\n")
    for o in outcomes:
        print(f"{o.model_type:28s} {o.status:10s} {(o.layout if o.status == 'works' else o.reason)[:120]}")
    total = sum(o.seconds or 0 for o in outcomes)
    print(
        f"{len(outcomes)} architectures in {time.perf_counter() - start:.0f} s "
        f"({total:.0f} s of checks in the workers); written {out or 'nothing (--only)'}"
    )


if __name__ == "__main__":
    main()
