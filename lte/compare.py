"""``lte compare``: LTE and the baselines on one model, one text and one protocol.

Every method runs on the same evaluation blocks of ``--data`` and is calibrated on the same
tokens (``--calibration``, or the first ``calibration_tokens`` tokens of ``--data``, which are
then not evaluated). Each block's first ``prompt_fraction`` is the prompt: GRIFFIN keeps it
dense and selects its experts from it, the other methods sparsify every position as they
would in deployment. Every method is scored on the same tokens: the predictions made at the
positions after the prompt (so GRIFFIN's are all made with its selected neurons):

* ``ppl``: perplexity of those tokens;
* ``kl``: mean KL(dense || method) of the next-token distributions there (the dense model is
  ``--model``; LTE is compared against it too);
* ``realized_sparsity``: fraction of FFN neurons (down-projection inputs) zeroed per token;
* ``ffn_flops_per_token``: FFN FLOPs per token including routers and predictors (CATS computes
  the whole gate; TEAL's sparse inputs skip weight columns).

LTE (``--lte RUN_DIR``, or an export directory, which names its run) gets its thresholds
re-tuned per target by the export's threshold tuning, so one trained run gives every point; at an
export's own target sparsity it runs at the export's thresholds (the exported model itself).
With ``--tasks``, lm-evaluation-harness scores each method's model on the task configs of
:mod:`lte.tasks` (the same numbers lm-eval's CLI gives on that model).
Outputs go to a temporary directory renamed to ``--out`` at the end: ``results.json`` (one row
per method and target), ``results.md`` and ``sparsity_vs_ppl.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .baselines import METHODS, Sparsified, dense_ffn_flops_per_token, ffn_sites
from .errors import UsageError
from .tasks import HEADLINE, check_lm_eval, prepare_tasks

logger = logging.getLogger("lte")

LTE = "lte"
ALL_METHODS = ("dense", LTE, *(m for m in METHODS if m != "dense"))


@dataclasses.dataclass
class CompareRequest:
    model: str
    data: str
    out: str
    methods: list[str]
    sparsity: list[float]
    lte: str | None = None
    calibration: str | None = None
    calibration_tokens: int = 16384
    block_size: int = 256
    max_eval_tokens: int = 65536
    prompt_fraction: float = 0.5
    expert_size: int | None = None
    allocation: str = "tuned"
    batch_size: int = 8
    device: str | None = None
    overwrite: bool = False
    tasks: dict[str, Path] = dataclasses.field(default_factory=dict)  # name -> file (lte.tasks)
    task_limit: int | None = 200

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
        for s in self.sparsity:
            if not 0 <= s < 1:
                raise UsageError(f"--sparsity {s} must lie in [0, 1)")
        for label, path in (("--data", self.data), ("--calibration", self.calibration)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{label} {path}: file not found")
        if not (Path(self.model) / "config.json").is_file():
            raise UsageError(f"--model {self.model}: no model there (expected a directory with config.json)")
        if self.block_size < 4:
            raise UsageError(f"--block-size {self.block_size} must be >= 4")
        if not 1 <= int(self.block_size * self.prompt_fraction) <= self.block_size - 2:
            raise UsageError(f"--prompt-fraction {self.prompt_fraction} must leave at least one prompt token and two "
                             f"scored positions in a block of {self.block_size}")
        if self.allocation not in ("tuned", "uniform"):
            raise UsageError(f"--allocation {self.allocation} must be tuned or uniform")
        if self.tasks:
            check_lm_eval()
        if Path(self.out).exists() and not self.overwrite:
            raise UsageError(f"{self.out} exists; pass --overwrite to replace it")


def token_blocks(text: str, tokenizer, block_size: int) -> torch.Tensor:
    """The text's tokens cut into [n, block_size] blocks (the last partial block is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    if n == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size]).reshape(n, block_size)


def batches_of(blocks: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": b, "labels": b.clone()} for b in blocks.split(batch_size)]


def lte_run_dir(path: str) -> Path:
    """A run directory, or the run an export directory was made from."""
    path = Path(path)
    report = path / "lte_export.json"
    if report.is_file():
        source = json.loads(report.read_text()).get("source_run")
        if source:
            return Path(source)
    return path


def lte_method(run: Path, calibration: list[dict], allocation: str, device, exported: dict | None = None):
    """The run's stage-2 model with an observer, and a function that sets thresholds per target
    (``exported``'s thresholds at its target: an export's ``lte_export.json``)."""
    from .export import below_trained_sparsity, stage2_model
    from .inject import load_lte, lte_layers
    from .pipeline import load_report
    from .thresholds import choose_thresholds, sensitivity, set_thresholds

    model = load_lte(stage2_model(run)).to(device).eval()
    handle = Sparsified(LTE, model)
    for site, layer in zip(handle.sites, lte_layers(model)):
        handle.router_flops += 2 * site.d_model * layer.num_experts

        def observe(module, args, logits, layer=layer, site=site):
            keep = torch.sigmoid(logits) > layer.threshold  # [B, T, experts]; experts are equal-size
            handle.count(site.index, keep)

        handle.hook(layer.lte_router.register_forward_hook(observe))
    cache = {}
    trained = load_report(run).get("sparsity")

    def set_target(target: float) -> None:
        if exported and abs(exported["target_sparsity"] - target) < 1e-9:
            set_thresholds(model, exported["thresholds"])
            return
        if warning := below_trained_sparsity(trained, target):
            logger.warning("compare: lte: %s %s", run, warning)
        with handle.disabled():
            if allocation == "tuned" and "sens" not in cache:
                cache["sens"] = sensitivity(model, calibration, progress=False)
            choose_thresholds(model, calibration, target, allocation, cache.get("sens"), progress=False)

    return model, handle, set_target


@torch.no_grad()
def score(model, reference, handle: Sparsified, batches: list[dict], prefix: int) -> dict:
    """NLL, KL to the reference and FFN statistics over the positions after ``prefix``."""
    device = next(model.parameters()).device
    handle.prefix = prefix
    handle.reset()
    nll = kl = 0.0
    tokens = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        # the predictions made at positions prefix .. T-2 (the positions each method runs sparse)
        with handle.disabled():
            ref = torch.log_softmax(reference(input_ids=ids).logits[:, prefix:-1].float(), dim=-1)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, prefix:-1].float(), dim=-1)
        targets = ids[:, prefix + 1:]
        nll += float(-logp.gather(-1, targets[..., None]).sum())
        kl += float((ref.exp() * (ref - logp)).sum())
        tokens += targets.numel()
    per_layer = handle.per_layer_sparsity()
    return {"ppl": math.exp(nll / tokens), "kl": kl / tokens, "realized_sparsity": sum(per_layer) / len(per_layer),
            "per_layer_sparsity": per_layer, "ffn_flops_per_token": handle.ffn_flops_per_token(), "scored_tokens": tokens}


def write_markdown(rows: list[dict], dense_flops: float, path: Path) -> None:
    tasks = list(dict.fromkeys(name for row in rows for name in row.get("tasks", {})))
    header = ["method", "target", "realized sparsity", "ppl", "KL to dense", "FFN FLOPs/token", "vs dense",
              *(f"{t} {HEADLINE[t]}" for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        if row.get("skipped"):
            cells = [row["method"], f"{row['target_sparsity']:.2f}", f"skipped: {row['skipped']}"] + [""] * (len(header) - 3)
        else:
            cells = [row["method"], f"{row['target_sparsity']:.2f}", f"{row['realized_sparsity']:.3f}", f"{row['ppl']:.4f}",
                     f"{row['kl']:.4f}", f"{row['ffn_flops_per_token']:.4g}", f"{row['ffn_flops_per_token'] / dense_flops:.3f}x",
                     *(f"{row['tasks'][t][HEADLINE[t]]:.3f}" for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity against realized sparsity (left) and against FFN FLOPs per token relative to dense
    (right): methods that compute more than they skip (CATS's full gate, routers) sit further left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_sparsity, by_flops) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    dense = [r for r in rows if r["method"] == "dense" and not r.get("skipped")]
    dense_flops = dense[0]["ffn_flops_per_token"] if dense else None
    for method in methods:
        done = sorted((r for r in rows if r["method"] == method and not r.get("skipped")),
                      key=lambda r: r["realized_sparsity"])
        if not done:
            continue
        line, = by_sparsity.plot([100 * r["realized_sparsity"] for r in done], [r["ppl"] for r in done], marker="o",
                                 label=method)
        if dense_flops:
            by_flops.plot([r["ffn_flops_per_token"] / dense_flops for r in done], [r["ppl"] for r in done], marker="o",
                          color=line.get_color(), label=method)
    for ax in (by_sparsity, by_flops):
        if dense:
            ax.axhline(dense[0]["ppl"], color="black", linestyle="--", label="dense")
        ax.grid(alpha=0.3)
    by_sparsity.set(xlabel="realized FFN sparsity, % per token\n(neurons skipped; zero weights for sparse_expansion)",
                    ylabel="perplexity (scored tokens)")
    by_sparsity.set_yscale("log")
    by_flops.set(xlabel="FFN FLOPs per token, relative to dense\n(including routers, predictors and CATS's full gate)")
    by_flops.invert_xaxis()  # cheaper to the right, as sparser is on the left panel
    by_sparsity.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(request: CompareRequest, progress: bool = True) -> list[dict]:
    request.validate()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(request.model)
    model = AutoModelForCausalLM.from_pretrained(request.model, dtype=torch.float32).to(device).eval()
    text = Path(request.data).read_text()
    blocks = token_blocks(text, tokenizer, request.block_size)
    if request.calibration:
        calibration_blocks = token_blocks(Path(request.calibration).read_text(), tokenizer, request.block_size)
    else:  # the first blocks of --data calibrate; the evaluation starts after them
        n = max(1, -(-request.calibration_tokens // request.block_size))
        if n >= len(blocks):
            raise UsageError(f"--data has {len(blocks)} blocks of {request.block_size} tokens: too few to hold out "
                             f"{n} for calibration; give --calibration FILE or more text")
        calibration_blocks, blocks = blocks[:n], blocks[n:]
    calibration_blocks = calibration_blocks[: max(1, -(-request.calibration_tokens // request.block_size))]
    blocks = blocks[: max(1, request.max_eval_tokens // request.block_size)]
    calibration = batches_of(calibration_blocks, request.batch_size)
    evaluation = batches_of(blocks, request.batch_size)
    prefix = int(request.block_size * request.prompt_fraction)
    sites = ffn_sites(model)
    dense_flops = dense_ffn_flops_per_token(sites)
    expert_size = request.expert_size
    lte_model = lte_handle = set_target = None
    skipped: dict[str, str] = {}
    if LTE in request.methods:
        if request.lte is None:
            skipped[LTE] = "no --lte RUN_OR_EXPORT_DIR given"
        else:
            run = lte_run_dir(request.lte)
            export_report = Path(request.lte) / "lte_export.json"
            exported = json.loads(export_report.read_text()) if export_report.is_file() else None
            lte_model, lte_handle, set_target = lte_method(run, calibration, request.allocation, device, exported)
            if lte_model.config.vocab_size != model.config.vocab_size:
                skipped[LTE] = f"its vocabulary ({lte_model.config.vocab_size}) differs from --model's ({model.config.vocab_size})"
            if expert_size is None:
                expert_size = json.loads((Path(run) / "stage2" / "model" / "lte_config.json").read_text())["expert_size"]
    if expert_size is None:
        expert_size = 32
    task_dir = tempfile.TemporaryDirectory(prefix="lte-tasks-")  # lm-eval's configs over the task files
    task_run = prepare_tasks(request.tasks, Path(task_dir.name), request.task_limit) if request.tasks else None
    logger.info("compare: %d evaluation blocks of %d tokens (first %d = prompt), %d calibration blocks, on %s",
                len(blocks), request.block_size, prefix, len(calibration_blocks), device)

    rows = []
    caches: dict[str, dict] = {}
    jobs = [(m, s) for m in request.methods for s in ([0.0] if m == "dense" else request.sparsity)]
    for method, target in tqdm(jobs, desc="Comparing", disable=not progress):
        row = {"method": method, "target_sparsity": target}
        if method in skipped:
            rows.append({**row, "skipped": skipped[method]})
            continue
        if method == LTE:
            set_target(target)
            scored_model, handle = lte_model, lte_handle
        else:
            kwargs = {"expert_size": expert_size} if method == "moefication" else {}
            scored_model = model
            try:
                handle = METHODS[method](model, target, calibration, cache=caches.setdefault(method, {}), **kwargs)
            except ValueError as exc:  # the method does not apply to this model
                rows.append({**row, "skipped": str(exc)})
                continue
        try:
            result = score(scored_model, model, handle, evaluation, prefix)
            if task_run:
                result["tasks"] = task_run.score(scored_model, tokenizer, request.batch_size, handle)
        finally:
            if method != LTE:
                handle.remove()
        rows.append({**row, **result})
        logger.info("compare: %-11s target %.2f  realized %.3f  ppl %.4f  KL %.4f  FFN FLOPs %.3fx", method, target,
                    result["realized_sparsity"], result["ppl"], result["kl"], result["ffn_flops_per_token"] / dense_flops)
    task_dir.cleanup()
    write_results(request, rows, dense_flops)
    return rows


def write_results(request: CompareRequest, rows: list[dict], dense_flops: float) -> None:
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = {"model": request.model, "data": request.data, "lte": request.lte, "block_size": request.block_size,
                "tasks": {name: str(path) for name, path in request.tasks.items()}, "task_limit": request.task_limit,
                "prompt_fraction": request.prompt_fraction, "dense_ffn_flops_per_token": dense_flops,
                "calibration": request.calibration or f"first {request.calibration_tokens} tokens of --data"}
        (tmp / "results.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
        write_markdown(rows, dense_flops, tmp / "results.md")
        plot(rows, tmp / "sparsity_vs_ppl.png", f"{request.model} on {request.data}")
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
