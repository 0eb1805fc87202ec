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
tuned per target by the export's threshold tuning on the shared calibration tokens. One run can
serve every target, or each target its own run, trained for it (``--lte 0.5=RUN_A,0.7=RUN_B``; a
run without a target serves the rest); each LTE row names its ``run`` and its ``thresholds``.
At an export's own target sparsity an export directory runs at the export's thresholds (the exported
model itself). ``--extra-data NAME=FILE`` scores every method on more held-out sources (a second text)
through the same code path: ``extra_data[NAME]`` in each row; ``--layouts eos`` adds ``--data``'s own
held-out paragraphs each after an EOS token (``extra_data["eos_doc"]``), the layout of a client that
sends documents one after another, since a method fitted to one layout can fail on another.
With ``--tasks``, lm-evaluation-harness scores each method's model on the task configs of
:mod:`lte.compare.tasks` (the same numbers lm-eval's CLI gives on that model).
Outputs go to a temporary directory renamed to ``--out`` at the end (:mod:`lte.core.outputs`): ``results.json`` (one row
per method and target), ``results.md`` and ``sparsity_vs_ppl.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.cli_args import count_or_all, fraction, name_list, number_list, positive_int
from ..core.errors import UsageError
from ..core.outputs import check_out, disk_guard, staged_dir
from ..core.run_dir import export_report_file, lte_config_file, stage2_model, stage_model
from ..export.thresholds import ALLOCATIONS
from .baselines import METHODS, Sparsified, dense_ffn_flops_per_token, ffn_sites
from .tasks import HEADLINE, check_lm_eval, prepare_tasks

logger = logging.getLogger("lte")

LTE = "lte"
ALL_METHODS = ("dense", LTE, *(m for m in METHODS if m != "dense"))
PLOT_CEILING = 2.5  # the plot's perplexity axis ends at this multiple of dense's
MAIN_SOURCE = "--data"  # the held-out source of each row's own ppl/kl; --extra-data adds others


def _field(default=dataclasses.MISSING, help: str = "", **cli):
    """A request field whose ``help`` and argparse settings make its ``lte compare`` flag (:mod:`lte.core.cli_args`)."""
    factory = dataclasses.MISSING
    if isinstance(default, list):
        default, factory = dataclasses.MISSING, (lambda value=default: list(value))
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **cli})


@dataclasses.dataclass
class CompareRequest:
    model: str = _field(help="The dense base model directory (the reference).")
    data: str = _field(help="Held-out text file.")
    out: str = _field(help="Output directory.")
    methods: list[str] = _field(
        ["dense", LTE, "griffin", "teal", "cats", "moefication", "sparse_expansion"],
        "Comma-separated: " + ", ".join(ALL_METHODS) + ".",
        type=name_list,
    )
    sparsity: list[float] = _field([0.5, 0.7, 0.9], "Comma-separated target FFN sparsities.", type=number_list)
    lte: str | None = _field(
        None,
        "An `lte train` run directory, or an export directory (uses the run it names), for every "
        "target; or one run per target: 0.5=RUN_A,0.7=RUN_B,0.9=RUN_C (a run without a target serves the rest).",
    )
    calibration: str | None = _field(None, "Calibration text file (default: the first --calibration-tokens of --data).")
    calibration_tokens: int = _field(16384, "Calibration tokens every method is fitted on.", type=positive_int)
    block_size: int = _field(256, "Tokens per evaluation block.", type=positive_int)
    max_eval_tokens: int = _field(
        65536,
        "Most tokens of --data scored per method (after the calibration blocks when --calibration is not given).",
        type=positive_int,
    )
    prompt_fraction: float = _field(
        0.5, "Leading share of each block that is the prompt (GRIFFIN selects from it; not scored).", type=fraction
    )
    expert_size: int | None = _field(
        None, "MoEfication expert size (default: the LTE run's, else 32).", type=positive_int
    )
    allocation: str = _field("tuned", "LTE's per-layer threshold tuning.", choices=list(ALLOCATIONS))
    batch_size: int = _field(8, "Evaluation batch size.", type=positive_int)
    device: str | None = _field(None, "cpu or cuda (default: cuda when available).", choices=["cpu", "cuda"])
    overwrite: bool = _field(False, "Replace --out if it exists.")
    # name -> file (lte.compare.tasks); the command builds it from --tasks and --task-dir
    tasks: dict[str, Path] = dataclasses.field(default_factory=dict, metadata={"cli": False})
    task_limit: int | None = _field(200, "Examples per task (0: all).", type=count_or_all)
    extra_data: dict[str, Path] = dataclasses.field(
        default_factory=dict,
        metadata={  # name -> held-out text file
            "help": "More held-out text every method is also scored on (ppl, KL, sparsity per source).",
            "type": lambda spec: parse_extra_data(spec),
            "metavar": "NAME=FILE[,NAME=FILE]",
        },
    )

    layouts: list[str] = _field(
        [],
        "Also score --data's held-out paragraphs (blank-line separated) laid out as documents after a marker: "
        "eos (each after the tokenizer's end-of-sequence token, as a client that appends turns sends them) "
        "and/or bos (each after its begin-of-sequence token); each is a source named LAYOUT_doc.",
        type=name_list,
        metavar="eos[,bos]",
    )

    def lte_runs(self) -> dict[float, Path]:
        """The LTE run of each target (``{}`` without ``--lte``)."""
        return parse_lte_runs(self.lte, self.sparsity)

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
            raise UsageError(
                f"--prompt-fraction {self.prompt_fraction} must leave at least one prompt token and two "
                f"scored positions in a block of {self.block_size}"
            )
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation {self.allocation} must be one of {', '.join(ALLOCATIONS)}")
        unknown = [layout for layout in self.layouts if layout not in DOC_MARKERS]
        if unknown:
            raise UsageError(f"--layouts {','.join(unknown)}: choose from {', '.join(DOC_MARKERS)}")
        for name in map(layout_source, self.layouts):
            if name in self.extra_data:
                raise UsageError(f"--extra-data {name} is also the name of a --layouts source; rename it")
        for name, path in self.extra_data.items():
            if name == MAIN_SOURCE:
                raise UsageError(f"--extra-data {name}={path}: {name} names --data's own rows; choose another name")
            if not Path(path).is_file():
                raise UsageError(
                    f"--extra-data {name}={path}: file not found; give NAME=FILE with a held-out text file"
                )
        runs = self.lte_runs()
        if (
            self.expert_size is None
            and "moefication" in self.methods
            and LTE in self.methods
            and len(expert_sizes(runs)) > 1
        ):
            raise UsageError(
                f"the --lte runs have expert sizes {', '.join(map(str, expert_sizes(runs)))}; give "
                f"--expert-size for MoEfication"
            )
        if self.tasks:
            check_lm_eval()
        check_out(
            self.out,
            "compare",
            overwrite=self.overwrite,
            runs={f"the --lte run {run}": run for run in sorted(set(runs.values()))},
            inputs={
                "--model": self.model,
                "--data": self.data,
                "--calibration": self.calibration,
                **{f"--extra-data {name}": path for name, path in self.extra_data.items()},
                **{f"--tasks {name}": path for name, path in self.tasks.items()},
            },
        )


def token_blocks(text: str, tokenizer, block_size: int, what: str = "the text") -> torch.Tensor:
    """The text's tokens cut into [n, block_size] blocks (the last partial block is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    if n == 0:
        raise UsageError(f"{what} has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size]).reshape(n, block_size)


DOC_MARKERS = ("eos", "bos")  # --layouts: the token each held-out document follows


def layout_source(layout: str) -> str:
    return f"{layout}_doc"


def layout_marker(tokenizer, layout: str) -> int:
    """The token each document follows in ``--layouts LAYOUT`` (checked before the model loads)."""
    marker = tokenizer.eos_token_id if layout == "eos" else tokenizer.bos_token_id
    if marker is None:
        raise UsageError(f"--layouts {layout}: the tokenizer has no {layout.upper()} token; drop {layout}")
    return marker


def text_end_of_tokens(text: str, tokenizer, n: int) -> int:
    """The character offset in ``text`` where its first ``n`` tokens (as :func:`token_blocks` cuts
    them) end: from the fast tokenizer's offsets, else from the decoded tokens' length."""
    if n <= 0:
        return 0
    if tokenizer.is_fast:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return offsets[min(n, len(offsets)) - 1][1]
    return len(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n]))


def marked_documents(text: str, tokenizer, marker: int, start: int, max_tokens: int) -> tuple[list[int], list[int]]:
    """``text``'s paragraphs (split at blank lines, as ``data.sample_by=paragraph`` splits a file) that
    begin at or after character ``start`` (after the calibration part), as one token stream, each after
    ``marker``: the layout a client produces when it sends documents one after another. Returns the ids
    and their labels, -100 on the markers (they are context, not text to predict); stops after
    ``max_tokens``."""
    ids: list[int] = []
    labels: list[int] = []
    offset = 0
    for paragraph in text.split("\n\n"):
        begins, offset = offset, offset + len(paragraph) + 2
        if begins < start or not paragraph.strip():
            continue
        tokens = tokenizer(paragraph.strip("\n"), add_special_tokens=False)["input_ids"]
        ids += [marker, *tokens]
        labels += [-100, *tokens]
        if len(ids) >= max_tokens:
            break
    return ids, labels


def batches_of(blocks: torch.Tensor, batch_size: int, labels: torch.Tensor | None = None) -> list[dict]:
    """Batches of ``blocks``; every token is a label unless ``labels`` (same shape, -100: not scored) says."""
    labels = blocks.clone() if labels is None else labels
    return [
        {"input_ids": b, "labels": t} for b, t in zip(blocks.split(batch_size), labels.split(batch_size), strict=True)
    ]


def lte_run_dir(path: str) -> Path:
    """A run directory, or the run an export directory was made from."""
    path = Path(path)
    report = export_report_file(path)
    if report.is_file():
        source = json.loads(report.read_text()).get("source_run")
        if source:
            return Path(source)
    return path


def parse_lte_runs(spec: str | None, targets: list[float]) -> dict[float, Path]:
    """``--lte``: ``RUN`` (one run for every target) or ``TARGET=RUN`` pairs, one run trained for each
    target; a ``RUN`` without a target among the pairs serves the targets not named. Each ``RUN`` is a
    run directory or an export directory (its run is used). Checked before any work."""
    if not spec:
        return {}
    example = "e.g. --lte 0.5=runs/a,0.7=runs/b,0.9=runs/c, or --lte runs/a for every target"
    named: dict[float, str] = {}
    default = None
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            if default is not None:
                raise UsageError(
                    f"--lte {spec}: two runs without a target ({default}, {item}); write TARGET=RUN_DIR, {example}"
                )
            default = item
            continue
        key, path = (part.strip() for part in item.split("=", 1))
        try:
            target = float(key)
        except ValueError:
            target = None
        if target is None or not path:
            raise UsageError(f"--lte {item!r}: expected TARGET=RUN_DIR with TARGET one of --sparsity, {example}")
        match = [t for t in targets if math.isclose(t, target, abs_tol=1e-9)]
        if not match:
            raise UsageError(
                f"--lte {item}: {key} is not a target of --sparsity {','.join(f'{t:g}' for t in targets)}; "
                f"add it to --sparsity or drop the pair"
            )
        if match[0] in named:
            raise UsageError(f"--lte names target {key} twice; give one run per target, {example}")
        named[match[0]] = path
    missing = [f"{t:g}" for t in targets if t not in named]
    if missing and default is None:
        raise UsageError(
            f"--lte has no run for target {', '.join(missing)} of --sparsity; add TARGET=RUN_DIR for it, "
            f"or one RUN_DIR without a target for the targets not named"
        )
    runs = {}
    for target in targets:
        given = named.get(target, default)
        try:
            stage2_model(run := lte_run_dir(given))
        except UsageError as exc:
            raise UsageError(f"--lte {f'{target:g}={given}' if target in named else given}: {exc}") from None
        runs[target] = run
    return runs


def expert_sizes(runs: dict[float, Path]) -> list[int]:
    """The distinct expert sizes of the LTE runs."""
    return sorted(
        {json.loads(lte_config_file(stage_model(run, "stage2")).read_text())["expert_size"] for run in runs.values()}
    )


def parse_extra_data(spec: str) -> dict[str, Path]:
    """``--extra-data NAME=FILE[,NAME=FILE]``: more held-out sources every method is scored on."""
    sources: dict[str, Path] = {}
    for item in (i.strip() for i in spec.split(",")):
        name, sep, path = (part.strip() for part in item.partition("="))
        if not (sep and name and path):
            raise UsageError(
                f"--extra-data {item!r}: expected NAME=FILE[,NAME=FILE], e.g. --extra-data wikitext=wiki.txt"
            )
        if name in sources:
            raise UsageError(f"--extra-data names {name} twice; give each source its own name")
        sources[name] = Path(path)
    return sources


def export_reports(spec: str | None) -> dict[Path, list[dict]]:
    """The ``lte_export.json`` of each ``--lte`` entry that is an export directory, by its run (one
    run may have several exports, one per target)."""
    reports: dict[Path, list[dict]] = {}
    for item in (spec or "").split(","):
        path = Path(item.split("=", 1)[-1].strip())
        if item.strip() and export_report_file(path).is_file():
            reports.setdefault(lte_run_dir(str(path)), []).append(json.loads(export_report_file(path).read_text()))
    return reports


def lte_method(run: Path, calibration: list[dict], allocation: str, device, exported: list[dict] | None = None):
    """The run's stage-2 model with an observer, and a function that sets thresholds per target
    (an export's thresholds at its own target: ``exported`` holds the run's ``lte_export.json``s)."""
    from ..export.exporter import below_trained_sparsity
    from ..export.thresholds import choose_thresholds, sensitivity, set_thresholds
    from ..model.inject import load_lte, lte_layers
    from ..model.layers import collect_router_scores
    from ..training.loading import load_report

    model = load_lte(stage2_model(run)).to(device).eval()
    handle = Sparsified(LTE, model)
    routed = {}  # LTE layers inside routed experts: counted per (token, selected expert) from their records
    for site, layer in zip(handle.sites, lte_layers(model), strict=True):
        handle.router_flops += site.top_k * 2 * site.d_model * layer.num_experts
        if site.experts is not None:
            routed[layer.layer_index] = site
            continue

        def observe(module, args, logits, layer=layer, site=site):
            keep = torch.sigmoid(logits) > layer.threshold  # [B, T, experts]; experts are equal-size
            handle.count(site.index, keep)

        handle.hook(layer.lte_router.register_forward_hook(observe))
    if routed:
        open_blocks: list = []

        def start(module, args):  # not while the thresholds are tuned (disabled): that collects the records
            block = collect_router_scores() if handle.enabled else contextlib.nullcontext([])
            open_blocks.append((block, block.__enter__()))

        def finish(module, args, output):
            if not open_blocks:  # a pre-hook before start raised
                return
            block, records = open_blocks.pop()
            block.__exit__(None, None, None)
            if output is None:  # the forward raised: nothing to count
                return
            for record in records:
                if record.tokens is not None and record.layer in routed:
                    handle.count(routed[record.layer].index, record.scores > record.threshold, record.tokens)

        handle.hook(model.register_forward_pre_hook(start))
        handle.hook(model.register_forward_hook(finish, always_call=True))  # closed when a forward raises too
    cache = {}
    trained = load_report(run).get("sparsity")

    def set_target(target: float) -> dict:
        """Tune the thresholds to ``target`` (an export's own, at its target); returns what was chosen."""
        own = next((e for e in exported or [] if abs(e["target_sparsity"] - target) < 1e-9), None)
        if own is not None:
            set_thresholds(model, own["thresholds"])
            return {"allocation": own.get("allocation", "export"), "thresholds": list(own["thresholds"])}
        if warning := below_trained_sparsity(trained, target):
            logger.warning("compare: lte: %s %s", run, warning)
        with handle.disabled():
            if allocation == "tuned" and "sens" not in cache:
                cache["sens"] = sensitivity(model, calibration, progress=False)
            chosen, _ = choose_thresholds(model, calibration, target, allocation, cache.get("sens"), progress=False)
        return {"allocation": chosen.allocation, "thresholds": [float(t) for t in chosen.thresholds]}

    return model, handle, set_target


@torch.no_grad()
def score(model, reference, handle: Sparsified, batches: list[dict], prefix: int) -> dict:
    """NLL, KL to the reference and FFN statistics over the positions after ``prefix`` whose next
    token is a label (not -100: the markers of ``--layouts`` are context, not text)."""
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
        targets = batch["labels"].to(device)[:, prefix + 1 :]
        scored = targets != -100
        nll += float(-(logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored).sum())
        kl += float(((ref.exp() * (ref - logp)).sum(-1) * scored).sum())
        tokens += int(scored.sum())
    per_layer = handle.per_layer_sparsity()
    return {
        "ppl": math.exp(nll / tokens),
        "kl": kl / tokens,
        "realized_sparsity": sum(per_layer) / len(per_layer),
        "per_layer_sparsity": per_layer,
        "ffn_flops_per_token": handle.ffn_flops_per_token(),
        "scored_tokens": tokens,
    }


def write_markdown(rows: list[dict], dense_flops: float, path: Path) -> None:
    tasks = list(dict.fromkeys(name for row in rows for name in row.get("tasks", {})))
    extra = list(dict.fromkeys(name for row in rows for name in row.get("extra_data", {})))
    runs = any("run" in row for row in rows)  # the LTE run each row came from
    header = [
        "method",
        "target",
        *(["run"] if runs else []),
        "realized sparsity",
        "ppl",
        "KL to dense",
        "FFN FLOPs/token",
        "FFN FLOPs vs dense",
        *(f"ppl {name}" for name in extra),
        *(f"{t} {HEADLINE[t]}" for t in tasks),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lead = [row["method"], f"{row['target_sparsity']:.2f}", *([row.get("run", "")] if runs else [])]
        if row.get("skipped"):
            cells = [*lead, f"skipped: {row['skipped']}"] + [""] * (len(header) - len(lead) - 1)
        else:
            cells = [
                *lead,
                f"{row['realized_sparsity']:.3f}",
                f"{row['ppl']:.4f}",
                f"{row['kl']:.4f}",
                f"{row['ffn_flops_per_token']:.4g}",
                f"{row['ffn_flops_per_token'] / dense_flops:.3f}x",
                *(f"{row['extra_data'][name]['ppl']:.4f}" for name in extra),
                *(f"{row['tasks'][t][HEADLINE[t]]:.3f}" for t in tasks),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity against realized sparsity (left) and against FFN FLOPs per token relative to dense
    (right): methods that compute more than they skip (CATS's full gate, routers) sit further left."""
    fig = figure(rows, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(rows: list[dict], title: str):
    """:func:`plot`'s figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (by_sparsity, by_flops) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    dense = [r for r in rows if r["method"] == "dense" and not r.get("skipped")]
    dense_flops = dense[0]["ffn_flops_per_token"] if dense else None
    for method in methods:
        done = sorted(
            (r for r in rows if r["method"] == method and not r.get("skipped")), key=lambda r: r["realized_sparsity"]
        )
        if not done:
            continue
        (line,) = by_sparsity.plot(
            [100 * r["realized_sparsity"] for r in done], [r["ppl"] for r in done], marker="o", label=method
        )
        if dense_flops:
            by_flops.plot(
                [r["ffn_flops_per_token"] / dense_flops for r in done],
                [r["ppl"] for r in done],
                marker="o",
                color=line.get_color(),
                label=method,
            )
        if len({r.get("run") for r in done}) > 1:  # one run per target: name each point's run
            for r in done:
                name = Path(r["run"]).name
                by_sparsity.annotate(
                    name,
                    (100 * r["realized_sparsity"], r["ppl"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=line.get_color(),
                )
                if dense_flops:
                    by_flops.annotate(
                        name,
                        (r["ffn_flops_per_token"] / dense_flops, r["ppl"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                        color=line.get_color(),
                    )
    ylabel = "perplexity (scored tokens)"
    by_sparsity.set_yscale("log")
    ceiling = PLOT_CEILING * dense[0]["ppl"] if dense else None
    if ceiling and any(r.get("ppl", 0) > ceiling for r in rows):
        # the methods that matter sit near dense: cut the axis there, and mark what lies above at the edge
        low = min(r["ppl"] for r in rows if math.isfinite(r.get("ppl", math.inf)))
        for ax in (by_sparsity, by_flops):
            ax.set_ylim(low / 1.03, ceiling)
            stacked: dict[float, int] = {}  # labels at about the same x go one under the other
            for line in ax.get_lines():
                for x, y in zip(*line.get_data(), strict=True):
                    if y > ceiling:
                        key = round(x / (2.0 if ax is by_sparsity else 0.02))  # 2 points, or 0.02x of FLOPs
                        below = stacked[key] = stacked.get(key, -1) + 1
                        ax.plot(x, ceiling, marker="^", color=line.get_color(), clip_on=False)
                        ax.annotate(
                            f"{y:.3g}",
                            (x, ceiling),
                            fontsize=6,
                            xytext=(0, -9 - 7 * below),
                            textcoords="offset points",
                            ha="center",
                            color=line.get_color(),
                        )
        ylabel += f"\n(above {PLOT_CEILING:g}x dense: at the top edge, value written)"
    for ax in (by_sparsity, by_flops):
        if dense:
            ax.axhline(dense[0]["ppl"], color="black", linestyle="--", label="dense")
        ax.grid(alpha=0.3, which="both")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    by_sparsity.set(
        xlabel="realized FFN sparsity, % per token\n(neurons skipped; zero weights for sparse_expansion)",
        ylabel=ylabel,
    )
    by_flops.set(xlabel="FFN FLOPs per token, relative to dense\n(including routers, predictors and CATS's full gate)")
    by_flops.invert_xaxis()  # cheaper to the right, as sparser is on the left panel
    by_sparsity.legend(fontsize=7, framealpha=0.7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def compare(request: CompareRequest, progress: bool = True) -> list[dict]:
    request.validate()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..training.data import read_text_file
    from ..training.preflight import check_model

    check_model(request.model, "--model")  # a damaged model or bad file fails before any work
    text = read_text_file(request.data, "--data")
    calibration_text = read_text_file(request.calibration, "--calibration") if request.calibration else None
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(request.model)
    markers = {layout: layout_marker(tokenizer, layout) for layout in request.layouts}
    model = AutoModelForCausalLM.from_pretrained(request.model, dtype=torch.float32).to(device).eval()
    lte_runs = request.lte_runs() if request.lte else {}
    if lte_runs:  # the run's saved FFN layout, where it fits this model (no detection)
        saved = lte_config_file(stage_model(next(iter(lte_runs.values())), "stage2"))
        hosts = json.loads(saved.read_text()).get("ffn_hosts") if saved.is_file() else None
        names = dict(model.named_modules())
        if hosts and all(h["path"] in names for h in hosts):
            model.lte_ffn_hosts = hosts
    blocks = token_blocks(text, tokenizer, request.block_size)
    if request.calibration:
        calibration_blocks = token_blocks(calibration_text, tokenizer, request.block_size)
    else:  # the first blocks of --data calibrate; the evaluation starts after them
        n = max(1, -(-request.calibration_tokens // request.block_size))
        if n >= len(blocks):
            raise UsageError(
                f"--data has {len(blocks)} blocks of {request.block_size} tokens: too few to hold out "
                f"{n} for calibration; give --calibration FILE or more text"
            )
        calibration_blocks, blocks = blocks[:n], blocks[n:]
    calibration_blocks = calibration_blocks[: max(1, -(-request.calibration_tokens // request.block_size))]
    eval_blocks = max(1, request.max_eval_tokens // request.block_size)  # per source
    blocks = blocks[:eval_blocks]
    calibration = batches_of(calibration_blocks, request.batch_size)
    evaluation = batches_of(blocks, request.batch_size)
    sources = {MAIN_SOURCE: evaluation}  # every method is scored on each, the same way
    for name, path in request.extra_data.items():
        extra = token_blocks(
            read_text_file(path, f"--extra-data {name}"), tokenizer, request.block_size, f"--extra-data {name}={path}"
        )
        sources[name] = batches_of(extra[:eval_blocks], request.batch_size)
    # --data's calibration part, in characters: the layouts take the paragraphs after it
    calibrated = 0 if request.calibration else len(calibration_blocks) * request.block_size
    held = text_end_of_tokens(text, tokenizer, calibrated) if markers else 0
    for layout, marker in markers.items():
        ids, labels = marked_documents(text, tokenizer, marker, held, eval_blocks * request.block_size)
        n = min(len(ids) // request.block_size, eval_blocks)
        if n == 0:
            raise UsageError(
                f"--layouts {layout}: --data has {len(ids)} tokens of paragraphs (blank-line separated) after its "
                f"calibration part, fewer than one block of {request.block_size}; give more text or --calibration"
            )
        cut = n * request.block_size
        sources[layout_source(layout)] = batches_of(
            torch.tensor(ids[:cut]).reshape(n, -1), request.batch_size, torch.tensor(labels[:cut]).reshape(n, -1)
        )
    prefix = int(request.block_size * request.prompt_fraction)
    sites = ffn_sites(model)
    dense_flops = dense_ffn_flops_per_token(sites)
    expert_size = request.expert_size
    skipped: dict[str, str] = {}
    runs = request.lte_runs() if LTE in request.methods else {}
    if LTE in request.methods and not runs:
        skipped[LTE] = "no --lte RUN_OR_EXPORT_DIR given"
    if expert_size is None:  # MoEfication's: the LTE runs' (validate() checked they agree), else 32
        expert_size = (expert_sizes(runs) or [32])[0]
    exported = export_reports(request.lte)
    loaded: dict[Path, tuple] = {}  # the LTE run in memory (one at a time)

    def lte_for(run: Path) -> tuple:
        if run not in loaded:
            for _, handle, _ in loaded.values():
                handle.remove()
            loaded.clear()
            loaded[run] = lte_method(run, calibration, request.allocation, device, exported.get(run))
        return loaded[run]

    task_dir = tempfile.TemporaryDirectory(prefix="lte-tasks-")  # lm-eval's configs over the task files
    task_run = prepare_tasks(request.tasks, Path(task_dir.name), request.task_limit) if request.tasks else None
    logger.info(
        "compare: %d evaluation blocks of %d tokens (first %d = prompt), %d calibration blocks, on %s",
        len(blocks),
        request.block_size,
        prefix,
        len(calibration_blocks),
        device,
    )

    rows = []
    caches: dict[str, dict] = {}
    jobs = [(m, s) for m in request.methods for s in ([0.0] if m == "dense" else request.sparsity)]
    for method, target in tqdm(jobs, desc="Comparing", disable=not progress):
        row = {"method": method, "target_sparsity": target}
        if method in skipped:
            rows.append({**row, "skipped": skipped[method]})
            continue
        if method == LTE:
            row["run"] = str(runs[target])
            scored_model, handle, set_target = lte_for(runs[target])
            if scored_model.config.vocab_size != model.config.vocab_size:
                rows.append(
                    {
                        **row,
                        "skipped": f"its vocabulary ({scored_model.config.vocab_size}) differs from "
                        f"--model's ({model.config.vocab_size})",
                    }
                )
                continue
            row.update(set_target(target))
        else:
            kwargs = {"expert_size": expert_size} if method == "moefication" else {}
            scored_model = model
            try:
                handle = METHODS[method](model, target, calibration, cache=caches.setdefault(method, {}), **kwargs)
            except ValueError as exc:  # the method does not apply to this model
                rows.append({**row, "skipped": str(exc)})
                continue
        try:
            scores = {name: score(scored_model, model, handle, batches, prefix) for name, batches in sources.items()}
            result = scores.pop(MAIN_SOURCE)
            result["ffn_flops_vs_dense"] = result["ffn_flops_per_token"] / dense_flops
            if scores:
                result["extra_data"] = {
                    name: {key: s[key] for key in ("ppl", "kl", "realized_sparsity", "scored_tokens")}
                    for name, s in scores.items()
                }
            if task_run:
                result["tasks"] = task_run.score(scored_model, tokenizer, request.batch_size, handle)
        finally:
            if method != LTE:
                handle.remove()
        rows.append({**row, **result})
        logger.info(
            "compare: %-11s target %.2f  realized %.3f  ppl %.4f  KL %.4f  FFN FLOPs %.3fx%s",
            method,
            target,
            result["realized_sparsity"],
            result["ppl"],
            result["kl"],
            result["ffn_flops_vs_dense"],
            f"  ({row['run']})" if "run" in row else "",
        )
    task_dir.cleanup()
    write_results(request, rows, dense_flops)
    return rows


def write_results(request: CompareRequest, rows: list[dict], dense_flops: float) -> None:
    with disk_guard(request.out), staged_dir(request.out, "compare", overwrite=request.overwrite) as tmp:
        meta = {
            "model": request.model,
            "data": request.data,
            "lte": request.lte,
            "block_size": request.block_size,
            "tasks": {name: str(path) for name, path in request.tasks.items()},
            "task_limit": request.task_limit,
            "prompt_fraction": request.prompt_fraction,
            "dense_ffn_flops_per_token": dense_flops,
            "lte_runs": {f"{t:g}": str(run) for t, run in request.lte_runs().items()},
            "extra_data": {name: str(path) for name, path in request.extra_data.items()},
            "layouts": {
                layout_source(layout): f"--data's paragraphs, each after {layout.upper()}" for layout in request.layouts
            },
            "calibration": request.calibration or f"first {request.calibration_tokens} tokens of --data",
        }
        (tmp / "results.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
        write_markdown(rows, dense_flops, tmp / "results.md")
        plot(rows, tmp / "sparsity_vs_ppl.png", f"{request.model} on {request.data}")
