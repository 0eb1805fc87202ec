"""Run the architecture coverage (lte/tools/coverage.py) and write docs/architectures.md from it.

    HF_HUB_OFFLINE=1 python scripts/architectures.py [--only llama,olmo2] [--json out.json]

The README links the file; tests/model/test_architectures.py fails when it is out of date.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lte.tools.coverage import render_markdown, run_coverage, to_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--json", default=None, help="also write every outcome as JSON here")
    parser.add_argument("--out", default=str(REPO / "docs" / "architectures.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    outcomes = run_coverage(
        REPO / "assets" / "stories260K", only=[t for t in args.only.split(",") if t] or None, progress=True
    )
    Path(args.out).write_text(render_markdown(outcomes))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(outcomes), indent=1) + "\n")
    for o in outcomes:
        print(f"{o.model_type:28s} {o.status:10s} {(o.layout if o.status == 'works' else o.reason)[:120]}")
    print(f"{len(outcomes)} architectures in {time.perf_counter() - start:.0f} s; written {args.out}")


if __name__ == "__main__":
    main()
