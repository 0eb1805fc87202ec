"""Memory of the vLLM plugin: the engine process's resident memory (RSS) serving one export with the
plugin and without it (``VLLM_PLUGINS=none``), same export, same settings.

    python bench/vllm_rss.py OUT_DIR          # in the vLLM environment; writes bench/results/vllm_rss.json

The export: a random Llama, 8 layers, hidden 1024, FFN 4096 (128 experts of 32), fp32: 400 MB of FFN
weights. Each measurement is a fresh interpreter (engine in-process) after loading and generating 16
tokens for 4 prompts; the median of 3 runs.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIMS = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4
)

MEASURE = r"""
import json, sys, psutil
from vllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=8,
          kv_cache_memory_bytes=1 << 26, distributed_executor_backend="uni", seed=0)
llm.generate(["Once upon a time"] * 4, SamplingParams(max_tokens=16, temperature=0))
model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
print("RESULT", json.dumps({"rss": psutil.Process().memory_info().rss, "class": type(model).__name__}))
"""


def measure(export: Path, plugin: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(export)], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(line[len("RESULT ") :])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    from vllm_exports import export_tiny

    export = Path(sys.argv[1]) / "llama_rss"
    if not export.exists():
        export_tiny("llama", export, **DIMS)
    runs = {"plain": [], "plugin": []}
    for _ in range(3):
        for name in runs:
            runs[name].append(measure(export, plugin=name == "plugin"))
    rss = {name: statistics.median(r["rss"] for r in rows) for name, rows in runs.items()}
    row = {
        "model": DIMS,
        "ffn_weight_bytes": 3 * DIMS["hidden_size"] * DIMS["intermediate_size"] * DIMS["num_hidden_layers"] * 4,
        "rss_plain_mib": rss["plain"] / 2**20,
        "rss_plugin_mib": rss["plugin"] / 2**20,
        "ratio": rss["plugin"] / rss["plain"],
        "classes": {name: rows[0]["class"] for name, rows in runs.items()},
        "runs_mib": {name: [r["rss"] / 2**20 for r in rows] for name, rows in runs.items()},
    }
    out = REPO / "bench" / "results" / "vllm_rss.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
