"""Shared fixtures: offline, CPU, tiny models built from configs."""

import importlib.util
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Triton kernels run on the CPU under the interpreter where there is no GPU (read when a kernel
# is decorated, so before anything imports them).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import pytest
import torch
import transformers

from isolation import outside_the_clone_guard

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# One intra-op thread for the suite and every process it starts (training runs, `accelerate launch`'s ranks
# already get one from torchrun). Its models are tiny: a second OpenMP thread buys nothing, and on a busy CPU
# (`make test` runs the vLLM part beside this one on two cores) each parallel region waits for a descheduled
# thread: the smoke run took 136 s with two threads and 38 s with one. The tests of the kernels' parallel
# split run with the machine's default (KERNEL_THREADS, tests/export/test_kernels.py). An OMP_NUM_THREADS
# given to pytest is kept; the vLLM environment (tests/serve) is left as it was.
KERNEL_THREADS = torch.get_num_threads()
ONE_THREAD = not HAS_VLLM and "OMP_NUM_THREADS" not in os.environ
if ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def kernel_threads(monkeypatch):
    """The machine's default threads, in this process and the ones it starts, as before ONE_THREAD."""
    threads = torch.get_num_threads()
    torch.set_num_threads(KERNEL_THREADS)
    if ONE_THREAD:
        monkeypatch.delenv("OMP_NUM_THREADS")
    yield KERNEL_THREADS
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # small real files with their SOURCE.md: the tests read nothing outside the clone
STORIES = REPO / "assets" / "stories260K"

sys.addaudithook(outside_the_clone_guard(REPO.parent / "shared"))

SMALL = dict(vocab_size=64, num_hidden_layers=2)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)

# One tiny random config per supported FFN family.
FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "mistral": lambda: transformers.MistralConfig(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=32, intermediate_size=64, head_dim=8, **ATTN, **SMALL),
    "gemma": lambda: transformers.GemmaConfig(hidden_size=32, intermediate_size=64, head_dim=8, **ATTN, **SMALL),
    "phi3": lambda: transformers.Phi3Config(hidden_size=32, intermediate_size=64, pad_token_id=0, **ATTN, **SMALL),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, **SMALL
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        **SMALL,
    ),
}


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]()).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


# The main job with a few steps per stage (and the recipe's export stage), run once per session.
FAST = [
    "lte.stage1_steps=4",
    "lte.stage2_steps=4",
    "data.max_train_tokens=8192",
    "data.max_eval_tokens=4096",
    "lte.router_init_tokens=2048",
    "lte.router_init_steps=20",
    "train.per_device_train_batch_size=4",
    "train.save_steps=2",
    "train.save_total_limit=5",
    "train.logging_steps=1",
    "train.report_to=[]",
    "train.warmup_steps=0",
    "export.calibration_tokens=4096",
]


def run_train(out, *extra, entry=("train.py",)):
    proc = subprocess.run(
        [sys.executable, *entry, "recipe=tiny", f"output_dir={out}", *FAST, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run directory, completed process) of the smoke run of `train.py recipe=tiny`."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return out, run_train(out)


def pytest_collection_modifyitems(config, items):
    """A test that needs the session's training run is slow, like the ones marked so by hand. Tests
    marked ``vllm`` run where vLLM is installed (the vLLM environment, ``pytest -m vllm``) and are
    deselected elsewhere, whatever ``-m`` says: not skipped, not run."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if not HAS_VLLM:
        deselected = [item for item in items if item.get_closest_marker("vllm")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("vllm")]
