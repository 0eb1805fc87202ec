"""Family runs as a user makes them (docs/moe.md, docs/architectures.md): for each model type, a tiny random
model of it (the coverage harness's ``tiny_config``: a multimodal type is its ``...ForConditionalGeneration``),
the user's command ``python train.py recipe=tiny model.name_or_path=DIR`` (both stages, the export at 50%),
then the export as a user without this project loads it: the base class (dense) and
``trust_remote_code=True`` (sparse) through every Auto class its ``auto_map`` names, each generating
(tests/export_clients.py, in an isolated interpreter).

    python scripts/family_runs.py --set moe          # qwen3_moe qwen2_moe mixtral olmoe gpt_oss nemotron_h
    python scripts/family_runs.py --set multimodal   # gemma3 qwen3_5 gemma4_text gemma4
    python scripts/family_runs.py MODEL_TYPE ... [--out DIR] [--steps N] [--override KEY=VALUE ...]

Prints one markdown table row per model type and writes DIR/results.json. A documented check, not a test:
CI runs the qwen2_moe recipe (tests/training/test_moe_pipeline.py), the mechanism per MoE family, and a
tiny Gemma 3 multimodal export (tests/export/test_multimodal.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "moe": ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "nemotron_h"],
    "multimodal": ["gemma3", "qwen3_5", "gemma4_text", "gemma4"],
}
CLIENTS = REPO / "tests" / "export_clients.py"
# The coverage harness's tiny Qwen2-MoE gives its shared expert the model's width (64 = hidden): square
# projections that detection cannot orient (model.ffn_layout would). A wider one, as in the real model.
SIZES = {"qwen2_moe": {"shared_expert_intermediate_size": 128}}


def write_model(family: str, directory: Path) -> int:
    """A tiny random ``family`` model with stories260K's tokenizer in ``directory``; returns the expert size."""
    from lte.model.detect import candidates, ffn_widths
    from lte.tools.coverage import _expert_size, tiny_config

    config = tiny_config(family)
    for key, value in SIZES.get(family, {}).items():
        setattr(config, key, value)
    text_config = config.get_text_config()
    for text in [config] if text_config is config else [config, text_config]:  # a multimodal one's language model
        text.vocab_size = 512  # stories260K's tokenizer
        text.bos_token_id, text.eos_token_id = 1, 2
        if not 0 <= (getattr(text, "pad_token_id", None) or 0) < 512:  # kept where set (Gemma 4 needs one)
            text.pad_token_id = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K").save_pretrained(directory)
    candidates(model)
    return _expert_size(ffn_widths(model).values())


def client(check: str, export: Path, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-I", str(CLIENTS), check, str(export)],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        return {"error": (proc.stderr.strip().splitlines() or ["no RESULT line"])[-1]}
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])[str(export)]


def run_family(family: str, root: Path, steps: int, extra: Sequence[str] = ()) -> dict:
    model_dir, out = root / family / "model", root / family / "run"
    expert_size = write_model(family, model_dir)
    start = time.perf_counter()
    overrides = [
        f"model.name_or_path={model_dir}",
        f"output_dir={out}",
        f"lte.expert_size={expert_size}",
        f"lte.stage1_steps={steps}",
        f"lte.stage2_steps={steps}",
        "lte.router_init=centroid",  # routed experts start at their centroids; dense FFNs too, alike
        "train.report_to=[]",
        "train.save_steps=1000",
        *extra,  # --override: recipe keys as a user sets them (data.max_eval_tokens for a slow family)
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", "recipe=tiny", *overrides], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"family": family, "error": proc.stderr.strip().splitlines()[-1], "seconds": seconds}
    report = json.loads((out / "report.json").read_text())
    export = out / "export"
    sparse = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = sparse(ids).logits
        sparse.config.lte_routing = "dense"
        torch.save({"ids": ids, "dense": sparse(ids).logits, "sparse": trained}, export / "expected.pt")
    config = json.loads((export / "config.json").read_text())
    hosts = config["lte_ffn"]["hosts"]
    auto = {}  # every Auto class the export names, with remote code: the trained (routed) logits
    for name in config["auto_map"]:
        if name.startswith("AutoModel"):
            model = getattr(transformers, name).from_pretrained(export, trust_remote_code=True).eval()
            with torch.no_grad():
                auto[name] = float((model(ids).logits - trained).norm() / trained.norm())
    loaded = client("base_class", export, root / family)
    generated = client("generate", export, root / family)
    return {
        "family": family,
        "expert_size": expert_size,
        "hosts": len(hosts),
        "routed_hosts": sum(bool(h.get("experts")) for h in hosts),
        "heldout_sparsity": report["export"]["heldout_sparsity"],
        "sparsity_by_kind": report["export"].get("sparsity_by_kind", {}),
        "sparse_ppl": report["export"]["sparse_ppl"],
        "dense_ppl": report["export"]["dense_ppl"],
        "base_class": loaded.get("base_class"),
        "base_vs_dense": loaded.get("base_vs_dense"),
        "sparse_vs_trained": loaded.get("sparse_vs_trained"),
        "sparse_vs_base": loaded.get("sparse_vs_base"),
        "missing_unexpected": len(loaded.get("missing", [])) + len(loaded.get("unexpected", [])),
        "generated": {k: len(v) for k, v in generated.items() if k in ("dense", "sparse")},
        "auto_classes_vs_trained": auto,
        "client_error": loaded.get("error") or generated.get("error"),
        "seconds": seconds,
    }


def row(r: dict) -> str:
    if "error" in r or r.get("client_error"):
        return f"| `{r['family']}` | failed: {r.get('error') or r['client_error']} |"
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["sparsity_by_kind"].items())
    generated = r["generated"]
    return (
        f"| `{r['family']}` | {r['routed_hosts']} routed + {r['hosts'] - r['routed_hosts']} dense, groups of "
        f"{r['expert_size']} | {100 * r['heldout_sparsity']:.1f}% ({kinds}) | {r['sparse_ppl']:.2f} / "
        f"{r['dense_ppl']:.2f} | {r['base_class']}, {r['base_vs_dense']:.1e} | {r['sparse_vs_trained']:.1e} "
        f"(vs dense {r['sparse_vs_base']:.1e}) | {len(r['auto_classes_vs_trained'])}, "
        f"{max(r['auto_classes_vs_trained'].values(), default=float('nan')):.1e} | {generated.get('dense', 0)} / "
        f"{generated.get('sparse', 0)} | {r['seconds']:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types (default: --set's)")
    parser.add_argument("--set", choices=SETS, default="moe")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "family_runs")
    parser.add_argument("--steps", type=int, default=20, help="steps per stage")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="a recipe key for train.py (repeatable)"
    )
    args = parser.parse_args()
    families = args.families or SETS[args.set]
    results = []
    print(
        "| model type | hosts | held-out sparsity at 50% | ppl sparse / all groups | base class, vs dense | "
        "remote code vs trained | Auto classes, worst vs trained | tokens generated dense / sparse | train.py |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for family in families:
        try:
            results.append(run_family(family, args.out, args.steps, args.override))
        except Exception as exc:  # one family's failure is its row; the others still run
            results.append({"family": family, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
        print(row(results[-1]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
