"""Which of the coverage table's MoE rows LTE's module-tree stage now accepts (no forward, meta device).

    python scripts/moe_coverage_rows.py [MODEL_TYPE ...]     # default: every row docs/architectures.md refuses as MoE

Prints, per model type: ROUTABLE (``candidates`` accepts it) or REFUSED (with the reason), the number of
fused experts modules found, and their layout facts (gated, transposed, concatenated, biased). The full
check (detection's forward proof, training, export, reload) is ``python -m lte.tools.coverage``.
"""

import re
import sys
import warnings
from pathlib import Path

import torch
import transformers

from lte.model.detect import candidates
from lte.model.experts import experts_hosts
from lte.tools.coverage import tiny_config

TABLE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def main(model_types: list[str]) -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if not model_types:
        model_types = re.findall(r"^\| `([^`]+)` \|.*\| refused \| MoE models", TABLE.read_text(), re.MULTILINE)
    for model_type in model_types:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
        hosts = experts_hosts(model)
        try:
            candidates(model)
            status = "ROUTABLE"
        except Exception as exc:
            status = f"REFUSED {str(exc)[:150]}"
        facts = sorted({(f.gated, f.transposed, f.concatenated, f.bias) for f in hosts.values()})
        print(model_type, len(hosts), facts, status, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
