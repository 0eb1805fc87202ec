"""The CPU sparse-FFN kernel against the pure-torch reference."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import lte_kernels.cpu as cpu_kernel
from conftest import REPO

# (hidden, neurons, expert_size); 100: not a multiple of 16; the last is enough work for several threads
# (the kernel keeps products under 2^16 multiply-adds per thread on one thread)
SHAPES = [(64, 128, 8), (100, 96, 16), (256, 512, 32), (512, 1024, 32)]


def test_the_kernel_builds_here():
    assert (
        cpu_kernel.available()
    )  # a C++ compiler and ninja are part of the set-up; a silent fallback would hide a slow path


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_expert_matvecs_match_the_reference(shape, sparsity, dtype, tol):
    hidden, neurons, size = shape
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(neurons, hidden, generator=g).to(dtype)
    weight_t = torch.randn(neurons, hidden, generator=g).to(dtype)
    x = torch.randn(hidden, generator=g).to(dtype)
    experts = (torch.rand(neurons // size, generator=g) >= sparsity).nonzero().squeeze(1)
    if sparsity == 1.0:
        assert experts.numel() == 0
    rows = (experts[:, None] * size + torch.arange(size)).reshape(-1)
    y = cpu_kernel.expert_matvec(x, weight, experts, size).reshape(-1)
    want = weight.float()[rows] @ x.float()
    assert y.dtype == dtype and y.shape == (rows.numel(),)
    torch.testing.assert_close(
        y.float(), want, atol=tol * (1 + want.abs().amax().item() if want.numel() else 1), rtol=tol
    )
    h = torch.randn(rows.numel(), generator=g).to(dtype)
    out = cpu_kernel.expert_matvec_t(h, weight_t, experts, size).reshape(-1)
    want = h.float() @ weight_t.float()[rows]
    assert out.shape == (hidden,)
    torch.testing.assert_close(
        out.float(), want, atol=tol * (1 + want.abs().amax().item() if want.numel() else 1), rtol=tol
    )
    assert torch.equal(cpu_kernel.expert_matvec_t(h, weight_t, experts, size).reshape(-1), out)  # deterministic


@pytest.mark.parametrize("tokens", [2, 5])
def test_a_few_tokens_share_one_pass_over_their_union(tokens):
    hidden, neurons, size = 100, 96, 16
    g = torch.Generator().manual_seed(1)
    weight, weight_t = torch.randn(neurons, hidden, generator=g), torch.randn(neurons, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g)
    union = torch.tensor([0, 2, 3, 5])
    rows = (union[:, None] * size + torch.arange(size)).reshape(-1)
    y = cpu_kernel.expert_matvec(x, weight, union, size)
    torch.testing.assert_close(y, x @ weight[rows].T, atol=1e-4, rtol=1e-5)
    h = torch.randn(tokens, rows.numel(), generator=g)
    h[0, :size] = 0  # token 0 did not select the first union expert
    torch.testing.assert_close(
        cpu_kernel.expert_matvec_t(h, weight_t, union, size), h @ weight_t[rows], atol=1e-4, rtol=1e-5
    )


def test_offset_selects_the_second_chunk_of_a_fused_projection():
    weight = torch.randn(2 * 64, 32)
    experts = torch.tensor([1, 3])
    rows = (experts[:, None] * 16 + torch.arange(16)).reshape(-1)
    x = torch.randn(32)
    torch.testing.assert_close(
        cpu_kernel.expert_matvec(x, weight, experts, 16, offset=64).reshape(-1), weight[64 + rows] @ x
    )


def test_the_package_does_not_shadow_hugging_face_kernels(tmp_path):
    # An environment with both: a stand-in for Hugging Face's `kernels` on the path, run from the
    # repository root (where our kernels/ directory sits on sys.path as the current directory).
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("ORIGIN = 'huggingface'\n")
    code = "import kernels, lte_kernels.cpu; print(kernels.ORIGIN)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "huggingface"


def test_bench_kernel_prints_and_writes_rows(tmp_path, capsys):
    from lte.cli import main

    out = tmp_path / "rows.json"
    assert (
        main(["bench", "kernel", "--shape", "256x512", "--sparsity", "0,0.5", "--repeats", "2", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "| 256x512 | 1 | float32 | 0.50 | 50% |" in printed
    rows = json.loads(out.read_text())
    assert [r["sparsity"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert {"shape", "batch", "dtype", "sparsity", "dense_ms", "sparse_ms", "speedup"} <= set(r)
        assert (
            r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        )
        assert r["max_error"] < 1e-4 and r["launch"] == "eager" and r["sparse_of_bandwidth"] > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_bench_kernel_runs_the_triton_decode_step_it_times_on_gpus(batch, monkeypatch):
    # The --device cuda path (Triton kernels, selection on the device) on CPU tensors under
    # TRITON_INTERPRET=1: what it would time must compute the masked dense FFN.
    from lte.tools.bench import bench_kernel

    monkeypatch.setenv("LTE_FORCE_TRITON", "1")
    rows = bench_kernel(["64x256"], [0.0, 0.5], batch=batch, expert_size=16, repeats=1, progress=False)
    assert [r.sparsity for r in rows] == [0.0, 0.5]
    assert all(r.max_error < 1e-4 for r in rows), [r.max_error for r in rows]
    assert 0.5 <= rows[1].union < 1.0 and (batch > 1 or rows[1].union == 0.5)  # a few tokens read their union


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--shape", "4096by11008"], "HIDDENxFFN"),
        (["--device", "cuda"], "no CUDA device is visible"),
        (["--dtype", "float16"], "float16 is for CUDA"),
        (["--shape", "64x100"], "does not divide"),
        (["--batch", "9"], "1 to 8 tokens"),
    ],
)
def test_bench_kernel_bad_input(argv, phrase, capsys):
    from lte.cli import main

    assert main(["bench", "kernel", "--repeats", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_slot_kernels_match_the_reference(sparsity, dtype, tol, tokens):
    # The selection as the Triton kernels take it: (order, count) tensors, a slot per expert.
    hidden, neurons, size = 100, 96, 16
    g = torch.Generator().manual_seed(4)
    weight, weight_t = (
        torch.randn(neurons, hidden, generator=g).to(dtype),
        torch.randn(neurons, hidden, generator=g).to(dtype),
    )
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    on = torch.rand(tokens, neurons // size, generator=g) >= sparsity
    order, count = cpu_kernel.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    assert int(count) == union.numel() and torch.equal(order[: union.numel()].long(), union)
    rows = (union[:, None] * size + torch.arange(size)).reshape(-1)
    y = cpu_kernel.slot_matvec(x, weight, order, count, size)
    assert y.shape == (tokens, neurons) and y.dtype == dtype
    want = x.float() @ weight.float()[rows].T
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(y[:, : rows.numel()].float(), want, atol=tol * scale, rtol=tol)
    assert not y[:, rows.numel() :].any()  # unselected slots stay zero
    out = cpu_kernel.slot_matvec_t(y, weight_t, order, count, size)
    want = y[:, : rows.numel()].float() @ weight_t.float()[rows]
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(out.float(), want, atol=tol * scale, rtol=tol)
    assert torch.equal(cpu_kernel.slot_matvec_t(y, weight_t, order, count, size), out)  # deterministic


def test_the_kernels_are_custom_ops_that_compilers_trace():
    g = torch.Generator().manual_seed(5)
    weight, weight_t, x = (
        torch.randn(64, 32, generator=g),
        torch.randn(64, 32, generator=g),
        torch.randn(2, 32, generator=g),
    )
    experts = torch.tensor([1, 3, 6])
    order, count = cpu_kernel.select_experts(torch.tensor([[0, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool))
    h = torch.randn(2, 24, generator=g)
    cases = [
        (cpu_kernel._op_matvec, (x, weight, experts, 8, 0)),
        (cpu_kernel._op_matvec_t, (h, weight_t, experts, 8)),
        (cpu_kernel._op_slot, (x, weight, order, count, 8, 0)),
        (cpu_kernel._op_slot_t, (torch.randn(2, 64, generator=g), weight_t, order, count, 8)),
    ]
    for op, args in cases:  # schema, fake (meta) implementation against the real one, AOT dispatch
        torch.library.opcheck(op, args)
    assert str(cpu_kernel._op_slot._qualname) == f"lte_{cpu_kernel._HASH}::slot_matvec"

    def step(x):
        return cpu_kernel.slot_matvec_t(
            torch.relu(cpu_kernel.slot_matvec(x, weight, order, count, 8)), weight_t, order, count, 8
        )

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x))


_NAME_OF_A_COPY = r"""
import importlib.util, sys, torch
path, version = sys.argv[1], sys.argv[2]
if version:
    torch.__version__ = version
spec = importlib.util.spec_from_file_location("copy_of_cpu_kernel", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.extension_name())
"""


def test_the_extension_name_hashes_the_source_and_the_torch_version(tmp_path):
    source = (REPO / "kernels" / "cpu.py").read_text()
    changed = tmp_path / "changed.py"
    changed.write_text(source.replace("#include <vector>\n", "#include <vector>\n// another kernel\n", 1))

    def name(path, version=""):
        proc = subprocess.run(
            [sys.executable, "-c", _NAME_OF_A_COPY, str(path), version], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    here = cpu_kernel.extension_name()
    assert name(REPO / "kernels" / "cpu.py") == here
    assert name(changed) != here
    assert name(REPO / "kernels" / "cpu.py", "2.99.0") != here
    assert here.startswith("lte_cpu_sparse_ffn_")


_X86 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma {}\nbugs\t\t: sysret_ss_attrs\n\n"
)


def test_the_extension_name_hashes_the_instruction_set(tmp_path):
    """A build cache shared between machines (a network home) must not give an AVX-512 build to an
    AVX2 CPU: the CPU's feature flags are part of the name; the order they are listed in is not."""
    avx2, avx512, reordered = tmp_path / "avx2", tmp_path / "avx512", tmp_path / "reordered"
    avx2.write_text(_X86.format(""))
    avx512.write_text(_X86.format("avx512f avx512bw avx512_bf16"))
    reordered.write_text(_X86.format("avx512_bf16 avx512bw avx512f"))
    features = {path.name: cpu_kernel.cpu_features(str(path)) for path in (avx2, avx512, reordered)}
    assert features["avx2"] == "avx avx2 fma fpu sse sse2"  # the flags line only, not the bugs line
    names = {key: cpu_kernel.extension_name(cpu_kernel.isa_key(value)) for key, value in features.items()}
    assert names["avx2"] != names["avx512"] and names["avx512"] == names["reordered"]
    assert cpu_kernel.isa_key() == cpu_kernel.isa_key(cpu_kernel.cpu_features())  # this machine: /proc/cpuinfo
    assert cpu_kernel.cpu_features(str(tmp_path / "absent"))  # no /proc/cpuinfo: the compiler's view


def test_the_first_build_logs_one_line_and_a_rebuild_none(tmp_path):
    code = "import logging; logging.basicConfig(); import lte_kernels.cpu as c; print(c.available())"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    logs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
        logs.append([line for line in proc.stderr.splitlines() if "lte" in line.lower()])
    assert len(logs[0]) == 1 and "building the CPU sparse kernel" in logs[0][0], logs
    assert logs[1] == [], logs


_PORTABLE = r"""
import json, sys, torch
import lte_kernels.cpu as k
assert k.available()
g = torch.Generator().manual_seed(0)
errors = {}  # per dtype: the largest difference from the reference, relative to its largest entry
for dtype in (torch.float32, torch.bfloat16):
    weight, weight_t = (torch.randn(96, 100, generator=g).to(dtype) for _ in range(2))
    x = torch.randn(3, 100, generator=g)
    experts = torch.tensor([0, 2, 5])
    rows = (experts[:, None] * 16 + torch.arange(16)).reshape(-1)
    h = torch.randn(3, rows.numel(), generator=g)
    order, count = k.select_experts(torch.zeros(6, dtype=torch.bool).index_fill_(0, experts, True))
    slots = k.slot_matvec(x, weight, order, count, 16).float()
    assert slots[:, rows.numel():].abs().max() == 0  # the unselected slots
    pairs = [
        (k.expert_matvec(x, weight, experts, 16), x @ weight.float()[rows].T),
        (k.expert_matvec_t(h, weight_t, experts, 16), h @ weight_t.float()[rows]),
        (slots[:, : rows.numel()], x @ weight.float()[rows].T),
        (k.slot_matvec_t(slots, weight_t, order, count, 16), slots[:, : rows.numel()] @ weight_t.float()[rows]),
    ]
    errors[str(dtype)] = max(((got.float() - want).abs().max() / want.abs().max()).item() for got, want in pairs)
print(json.dumps({"name": k.extension_name(), "so": k._extension.__file__, "errors": errors}))
"""


def _vector_registers(shared_object: str) -> set[str]:
    """The 256- and 512-bit registers (AVX, AVX-512) the machine code of ``shared_object`` names."""
    listing = subprocess.run(["objdump", "-d", shared_object], capture_output=True, text=True, check=True).stdout
    return {register for register in ("%ymm", "%zmm") if register in listing}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the instruction-set check reads x86 registers")
def test_the_portable_build_runs_without_native_instructions():
    """``LTE_KERNEL_ISA=portable``: its own build (own name, built once per environment like the
    native one), no AVX/AVX-512 instructions in it although the native build here has them, and the
    same products as the reference."""
    env = {**os.environ, "LTE_KERNEL_ISA": "portable"}
    proc = subprocess.run([sys.executable, "-c", _PORTABLE], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    portable = json.loads(proc.stdout.strip().splitlines()[-1])
    assert portable["name"] != cpu_kernel.extension_name() and portable["name"].endswith("_portable_x86_64")
    assert portable["errors"]["torch.float32"] < 1e-6 and portable["errors"]["torch.bfloat16"] < 1e-2, portable
    assert cpu_kernel.available()
    assert _vector_registers(cpu_kernel._extension.__file__)  # -march=native on any x86 CPU with AVX
    assert not _vector_registers(portable["so"])


def test_an_unknown_instruction_set_setting_is_named_and_the_portable_build_used():
    # A typo must not break the import of every export (the remote code catches only ImportError).
    env = {**os.environ, "LTE_KERNEL_ISA": "avx9"}
    code = "import lte_kernels.cpu as k; print(k.extension_name())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LTE_KERNEL_ISA='avx9': expected 'native'" in proc.stderr and "building the portable kernel" in proc.stderr
    assert proc.stdout.strip().endswith("_portable_" + platform.machine())
