"""Wasserstein neurons: the distance itself, and `lte analyze wasserstein` end to end."""

import json
import subprocess
import sys

import numpy as np
import torch
from scipy.stats import norm

from conftest import REPO, STORIES
from lte.compare.wasserstein import distances


def test_distance_is_small_for_gaussian_neurons_and_large_for_skewed_ones():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(20000, 3, generator=generator) * 5 + 2  # z-scoring removes scale and shift
    skewed = torch.distributions.Exponential(1.0).sample((20000, 2))
    d = distances(torch.cat([gaussian, skewed], dim=1))
    assert (d[:3] < 0.02).all() and (d[3:] > 0.15).all(), d
    # the closed form for equal-size samples: mean |sorted z - normal quantiles|
    x = skewed[:, 0].double().numpy()
    z = np.sort((x - x.mean()) / x.std(ddof=1))
    closed = np.abs(z - norm.ppf((np.arange(1, len(z) + 1) - 0.5) / len(z))).mean()
    assert abs(d[3] - closed) < 1e-9


def test_analyze_wasserstein_end_to_end(tmp_path):
    out = tmp_path / "ws"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lte",
            "analyze",
            "wasserstein",
            str(STORIES),
            "--data",
            str(REPO / "assets" / "tinystories" / "eval.txt"),
            "--tokens",
            "2048",
            "--eval-tokens",
            "4096",
            "--top",
            "0.1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "wasserstein.json").read_text())
    assert len(report["layers"]) == 5 and report["eval_tokens"] == 4096
    stored = np.load(out / "distances.npz")
    assert sorted(stored) == [f"layer_{i:02d}" for i in range(5)] and all(stored[k].shape == (172,) for k in stored)
    for layer in report["layers"]:
        d = stored[f"layer_{layer['layer']:02d}"]
        assert layer["top_neurons"][0] == int(d.argmax()) and 0 < layer["median"] < layer["max"]
    row = report["experiment"][0]
    assert row["neurons_per_layer"] == [17] * 5 and len(row["ppl_random_draws"]) == 3
    assert row["ppl_top_wasserstein_removed"] > report["dense_ppl"] and row["ppl_random_removed"] > report["dense_ppl"]
    assert (out / "wasserstein_histograms.png").stat().st_size > 10_000
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "lte",
            "analyze",
            "wasserstein",
            str(STORIES),
            "--data",
            str(REPO / "assets" / "tinystories" / "eval.txt"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr and "Traceback" not in again.stderr
