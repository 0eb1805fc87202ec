"""``lte analyze wasserstein``: Sparse Expansion's "Wasserstein neurons" (Sawmya et al. 2024).

Per FFN neuron (a row of the gate projection, or of the input projection of a non-gated FFN),
its pre-activation outputs over calibration tokens are z-scored and compared with a standard
normal by the 1-Wasserstein distance (``scipy.stats.wasserstein_distance`` against the normal's
quantiles at (m - 1/2)/n; the paper gives no code for it, so this is the closed form for 1-D
distributions). The paper scores every FFN linear layer's rows; this scores the neurons LTE routes
(the gate rows). High-distance neurons are the ones the paper
calls entangled. The experiment: perplexity when the top W% of neurons by distance in every FFN
are removed (their down-projection input zeroed), against the same number of random neurons
(mean over three draws). The paper prunes those neurons' weights with SparseGPT instead; removing
them is the harsher, simpler test of the same question: are these neurons special?
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.cli_args import number_list, positive_int
from ..core.errors import UsageError
from ..core.outputs import check_out, disk_guard, staged_dir
from ..training.evaluate import evaluate_batches
from .baselines.sites import Sparsified, ffn_sites, run_batches

RANDOM_DRAWS = 3


def distances(pre_activations: torch.Tensor) -> np.ndarray:
    """[tokens, neurons] -> each neuron's W1 distance from N(0, 1) after z-scoring."""
    from scipy.stats import norm, wasserstein_distance

    x = pre_activations.double()
    z = ((x - x.mean(0)) / x.std(0).clamp_min(1e-12)).numpy()
    n = z.shape[0]
    normal = norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    return np.array([wasserstein_distance(z[:, i], normal) for i in range(z.shape[1])])


def first_rows(site) -> slice:
    """The gate half of a fused gate/up projection's outputs, or all of them."""
    return slice(0, site.width)


@torch.no_grad()
def neuron_distances(model, batches, tokens: int) -> list[np.ndarray]:
    """Per FFN, the distance of every neuron (pre-activations of the cluster-on projection)."""
    sites = ffn_sites(model)
    handles, outputs = [], [[] for _ in sites]
    for site in sites:
        projection = site.host.get_submodule(site.spec.cluster_on)

        def grab(module, args, output, site=site):
            outputs[site.index].append(output.detach().reshape(-1, output.shape[-1])[:, first_rows(site)].float().cpu())

        handles.append(projection.register_forward_hook(grab))
    run_batches(model, batches, handles, progress="Collecting pre-activations")
    return [
        distances(torch.cat(chunks)[:tokens]) for chunks in tqdm(outputs, desc="Wasserstein distances", leave=False)
    ]


@torch.no_grad()
def perplexity_without(model, batches, neurons: list[np.ndarray]) -> float:
    """Perplexity with the given neurons of every FFN removed (zeroed at the down projection)."""
    handle = Sparsified("removed", model)
    masks = []
    for site, chosen in zip(handle.sites, neurons, strict=True):
        keep = torch.ones(site.width, dtype=torch.bool)
        keep[torch.as_tensor(chosen, dtype=torch.long)] = False
        masks.append(keep)
        handle.mask_neurons(site, lambda site, z, call: masks[site.index].to(z.device).expand(z.shape))
    try:
        return evaluate_batches(model, batches).ppl
    finally:
        handle.remove()


def plot_histograms(per_layer: list[np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(per_layer)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.hist(per_layer[i], bins=40, color="tab:blue")
        ax.set_title(f"layer {i}: median {np.median(per_layer[i]):.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("W1 distance of the z-scored pre-activation from N(0, 1)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class WassersteinRequest:
    """``lte analyze wasserstein``: its fields are the command's flags (:mod:`lte.core.cli_args`)."""

    model: str = field(metadata={"help": "a model directory", "positional": True})
    data: str = field(metadata={"help": "Text file: calibration tokens first, then evaluation tokens."})
    out: str = field(metadata={"help": "Output directory."})
    tokens: int = field(default=8192, metadata={"help": "Calibration tokens for the distances.", "type": positive_int})
    eval_tokens: int = field(
        default=32768, metadata={"help": "Tokens for the perplexity experiment.", "type": positive_int}
    )
    top: list[float] = field(
        default_factory=lambda: [0.03, 0.1],
        metadata={"help": "Fractions of neurons per FFN to remove, comma-separated.", "type": number_list},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --out if it exists."})
    block_size: int = field(default=256, metadata={"cli": False})
    seed: int = field(default=0, metadata={"cli": False})


def analyze(request: WassersteinRequest) -> dict:
    model_dir, data, out, tokens, eval_tokens, block_size, top, overwrite, seed = (
        request.model,
        request.data,
        request.out,
        request.tokens,
        request.eval_tokens,
        request.block_size,
        request.top,
        request.overwrite,
        request.seed,
    )
    if not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"{model_dir}: no model there (expected a directory with config.json)")
    if not Path(data).is_file():
        raise UsageError(f"--data {data}: file not found")
    check_out(out, "analyze wasserstein", overwrite=overwrite, inputs={"the model": model_dir, "--data": data})
    if not all(0 < t < 1 for t in top):
        raise UsageError(f"--top {','.join(map(str, top))}: fractions must lie in (0, 1)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..training.data import read_text_file
    from ..training.preflight import check_model
    from .harness import batches_of, token_blocks

    check_model(model_dir, "model")  # a damaged model or bad file fails before any work
    text = read_text_file(data, "--data")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocks = token_blocks(text, tokenizer, block_size)
    n_calib = max(1, -(-tokens // block_size))
    if n_calib >= len(blocks):
        raise UsageError(
            f"--data has {len(blocks)} blocks of {block_size} tokens: too few for {tokens} calibration tokens"
        )
    calibration = batches_of(blocks[:n_calib], 8)
    evaluation = batches_of(blocks[n_calib:][: max(1, eval_tokens // block_size)], 8)
    per_layer = neuron_distances(model, calibration, tokens)
    base = perplexity_without(model, evaluation, [np.array([], dtype=int) for _ in per_layer])
    generator = np.random.default_rng(seed)
    experiment = []
    for fraction in tqdm(top, desc="Removing neurons", leave=False):
        counts = [max(1, round(fraction * len(d))) for d in per_layer]
        highest = [np.argsort(-d)[:k] for d, k in zip(per_layer, counts, strict=True)]
        random_ppl = [
            perplexity_without(
                model,
                evaluation,
                [generator.choice(len(d), k, replace=False) for d, k in zip(per_layer, counts, strict=True)],
            )
            for _ in range(RANDOM_DRAWS)
        ]
        experiment.append(
            {
                "fraction": fraction,
                "neurons_per_layer": counts,
                "ppl_top_wasserstein_removed": perplexity_without(model, evaluation, highest),
                "ppl_random_removed": float(np.mean(random_ppl)),
                "ppl_random_draws": random_ppl,
            }
        )
    report = {
        "model": model_dir,
        "data": data,
        "calibration_tokens": tokens,
        "eval_tokens": sum(b["input_ids"].numel() for b in evaluation),
        "dense_ppl": base,
        "experiment": experiment,
        "layers": [
            {
                "layer": i,
                "mean": float(d.mean()),
                "median": float(np.median(d)),
                "max": float(d.max()),
                "top_neurons": np.argsort(-d)[:16].tolist(),
            }
            for i, d in enumerate(per_layer)
        ],
    }
    with disk_guard(out), staged_dir(out, "analyze wasserstein", overwrite=overwrite) as tmp:
        (tmp / "wasserstein.json").write_text(json.dumps(report, indent=2) + "\n")
        np.savez_compressed(tmp / "distances.npz", **{f"layer_{i:02d}": d for i, d in enumerate(per_layer)})
        plot_histograms(
            per_layer,
            tmp / "wasserstein_histograms.png",
            f"{Path(model_dir).name}: Wasserstein distance per FFN neuron",
        )
    return report
