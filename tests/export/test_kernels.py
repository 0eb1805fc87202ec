"""The CPU sparse-FFN kernel against the pure-torch reference."""

import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

import lte_kernels.cpu as cpu_kernel
from conftest import REPO


@pytest.fixture(autouse=True)
def _machine_threads(kernel_threads):
    """The kernels split their work across threads: tested with the machine's default, not the suite's one."""


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


@pytest.mark.parametrize(("dtype", "baseline"), [("int8", "_weight_int8pack_mm"), ("int4", "_weight_int4pack_mm")])
def test_bench_kernel_times_quantized_rows_against_torchs_dense_int_kernels(dtype, baseline, tmp_path, capsys):
    from lte.cli import main

    out = tmp_path / "rows.json"
    argv = ["bench", "kernel", "--shape", "256x512", "--sparsity", "0,0.5", "--dtype", dtype, "--repeats", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    assert f"| 256x512 | 1 | {dtype} | 0.50 | 50% |" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["sparsity"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert baseline in r["baseline"] and r["dtype"] == dtype
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["max_error"] < 2e-2  # bf16 activations and output, against the dequantized masked FFN


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
        (["--dtype", "int8", "--batch", "2"], "batch 1"),
        (["--dtype", "int4", "--expert-size", "16"], "straddle two experts"),
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
from lte_kernels import quant
for bits in (8, 4):  # quantized rows, padded to whole groups (100 -> 128)
    qweight, scales = quant.quantize(torch.randn(192, 100, generator=g), bits)
    qweight_t, scales_t = quant.quantize(torch.randn(192, 100, generator=g), bits)
    dense, dense_t = quant.dequantize(qweight, scales, 100), quant.dequantize(qweight_t, scales_t, 100)
    experts = torch.tensor([0, 2, 5])
    rows = (experts[:, None] * 32 + torch.arange(32)).reshape(-1)
    x, h = torch.randn(3, 100, generator=g), torch.randn(3, rows.numel(), generator=g)
    order, count = k.select_experts(torch.zeros(6, dtype=torch.bool).index_fill_(0, experts, True))
    slots = k.slot_matvec(x, qweight, order, count, 32, 0, scales)
    assert slots[:, rows.numel():].abs().max() == 0
    pairs = [  # x in int8 blocks of 32 over its whole groups (96 of 100 entries), as the kernel multiplies it
        (slots[:, : rows.numel()], quant.quantized_activations(x, 96) @ dense[rows].T),
        (k.slot_matvec_t(slots, qweight_t, order, count, 32, scales_t, 100), slots[:, : rows.numel()] @ dense_t[rows]),
        (k.expert_matvec_t(h, qweight_t, experts, 32, scales_t, 100), h @ dense_t[rows]),
    ]
    # the down projection as compressed-tensors stores it ([100, 192], groups of 32 neurons), read transposed
    qdown, sdown = quant.quantize(torch.randn(100, 192, generator=g), bits)
    rows_c, scales_c = quant.transposed(quant.unpack(qdown, sdown), sdown, bits)
    dense_c = quant.dequantize(qdown, sdown).T
    column = k.slot_matvec_t(slots, rows_c, order, count, 32, scales_c, 100)
    pairs.append((column, quant.quantized_activations(slots[:, : rows.numel()]) @ dense_c[rows]))
    errors[f"int{bits}"] = max(((got - want).abs().max() / want.abs().max()).item() for got, want in pairs)
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
    assert portable["errors"]["int8"] < 1e-5 and portable["errors"]["int4"] < 1e-5, portable
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


# Quantized rows (kernels/quant.py): (hidden, neurons, expert_size, group); 100 and 200: rows padded to whole
# groups; the last is enough work for both threads and several column blocks.
QUANT_SHAPES = [(100, 192, 32, 32), (200, 256, 64, 64), (96, 256, 128, 32), (1024, 2048, 32, 32)]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(got.float(), want, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trips_within_half_a_step(bits):
    from lte_kernels import quant

    g = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 100, generator=g)
    weight[0, :32] = 0  # an all-zero group: scale 0, no division by zero
    qweight, scales = quant.quantize(weight, bits, 32)
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qweight.shape == (8, 128 * bits // 8) and scales.shape == (8, 4) and scales.dtype == torch.float16
    back = quant.dequantize(qweight, scales, 100)
    step = scales.float().repeat_interleave(32, dim=1)[:, :100]
    assert ((back - weight).abs() <= step / 2 + 1e-6 + 1e-3 * weight.abs()).all()  # 1e-3: the fp16 scale
    assert not back[0, :32].any() and scales[0, 0] == 0
    assert quant.unpack(qweight, scales)[:, 100:].eq(0).all()  # the padding
    assert quant.bits_per_weight(bits) == bits + 0.5


def test_int4_packs_a_group_as_q4_0_does():
    from lte_kernels import quant

    weight = torch.arange(-16, 16, dtype=torch.float32).reshape(1, 32) * (7 / 16)  # scale 7/16 / ... exact levels
    qweight, scales = quant.quantize(weight, 4, 32)
    q = quant.unpack(qweight, scales)[0]
    assert torch.equal(qweight[0] & 15, (q[:16] + 8).to(torch.uint8))  # byte i: entry i low ...
    assert torch.equal(qweight[0] >> 4, (q[16:] + 8).to(torch.uint8))  # ... and entry i + 16 high
    assert q.min() >= -8 and q.max() <= 7


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda q: q.quantize(torch.zeros(4, 64), 4, 16), "multiple of 32"),
        (lambda q: q.quantize(torch.zeros(4, 64), 3), "expected 8 or 4"),
        (lambda q: q.check_group_size(32, expert_size=48), "straddle two experts"),
    ],
)
def test_quantize_refuses_by_name(call, phrase):
    from lte_kernels import quant

    with pytest.raises(ValueError, match=phrase):
        call(quant)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_slot_kernels_match_the_dequantized_reference(bits, shape, sparsity, tokens):
    from lte_kernels import quant

    hidden, neurons, size, group = shape
    g = torch.Generator().manual_seed(7)
    weight, weight_t = (torch.randn(neurons, hidden, generator=g) for _ in range(2))
    qweight, scales = quant.quantize(weight, bits, group)
    qweight_t, scales_t = quant.quantize(weight_t, bits, group)
    dense, dense_t = quant.dequantize(qweight, scales, hidden), quant.dequantize(qweight_t, scales_t, hidden)
    x = torch.randn(tokens, hidden, generator=g)
    on = torch.rand(tokens, neurons // size, generator=g) >= sparsity
    on[:, 0] |= sparsity == 0.0  # 0: every expert, whatever the draw
    order, count = cpu_kernel.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    assert (union.numel() == neurons // size) if sparsity == 0 else (union.numel() == 0 if sparsity == 1 else True)
    rows = (union[:, None] * size + torch.arange(size)).reshape(-1)
    y = cpu_kernel.slot_matvec(x, qweight, order, count, size, 0, scales)
    assert y.shape == (tokens, neurons) and y.dtype == torch.float32
    xq = quant.quantized_activations(x, hidden // group * group)  # int8 blocks over the whole groups
    _close(y[:, : rows.numel()], xq @ dense[rows].T, 1e-5)
    assert not y[:, rows.numel() :].any()  # unselected slots stay zero
    out = cpu_kernel.slot_matvec_t(y, qweight_t, order, count, size, scales_t, hidden)
    assert out.shape == (tokens, hidden)
    _close(out, y[:, : rows.numel()] @ dense_t[rows], 1e-5)
    assert torch.equal(cpu_kernel.slot_matvec_t(y, qweight_t, order, count, size, scales_t, hidden), out)
    # the index selection: the same products
    _close(cpu_kernel.expert_matvec(x, qweight, union, size, 0, scales), xq @ dense[rows].T, 1e-5)
    h = y[:, : rows.numel()]
    _close(cpu_kernel.expert_matvec_t(h, qweight_t, union, size, scales_t, hidden), h @ dense_t[rows], 1e-5)


def test_activations_are_rounded_to_int8_blocks_of_32_as_q8_0():
    from lte_kernels import quant

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 100, generator=g) * torch.tensor([1e-3] * 32 + [10.0] * 68)  # blocks of unlike size
    x[1, 32:64] = 0
    q = quant.quantized_activations(x, 96)
    assert torch.equal(q[:, 96:], x[:, 96:])  # past the whole groups: as it is
    blocks, xb = q[:, :96].reshape(2, 3, 32), x[:, :96].reshape(2, 3, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(blocks.abs().amax(-1, keepdim=True), d * 127)  # each block's largest entry exact
    assert ((blocks - xb).abs() <= d / 2 + 1e-7 * xb.abs()).all()  # within half of its own block's step
    assert not blocks[1, 1].any()  # an all-zero block
    x[0, 70] = float("nan")
    assert (
        quant.quantized_activations(x)[0, 64:96].isnan().all()
        and not quant.quantized_activations(x)[0, :64].isnan().any()
    )
    assert torch.allclose(blocks / torch.where(d > 0, d, 1), (blocks / torch.where(d > 0, d, 1)).round(), atol=1e-4)


@pytest.mark.parametrize(("hidden", "neurons"), [(256, 64), (1024, 2048)])  # the second: two threads' columns
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_multiply_int8_activations_not_fp32(bits, hidden, neurons):
    """The kernel's products are those of the rounded activations (to fp32 rounding), and measurably not those
    of the fp32 ones: the integer path runs, in the row product and in the transposed one; a NaN activation
    reaches the output as with fp32 activations."""
    from lte_kernels import quant

    g = torch.Generator().manual_seed(12)
    qweight, scales = quant.quantize(torch.randn(neurons, hidden, generator=g), bits)
    qdown, sdown = quant.quantize(torch.randn(hidden, neurons, generator=g), bits)
    rows_t, scales_t = quant.transposed(quant.unpack(qdown, sdown), sdown, bits)
    x = torch.randn(1, hidden, generator=g)
    every = cpu_kernel.select_experts(torch.ones(neurons // 32, dtype=torch.bool))
    y = cpu_kernel.slot_matvec(x, qweight, *every, 32, 0, scales)
    out = cpu_kernel.slot_matvec_t(y, rows_t, *every, 32, scales_t, hidden)
    dense, dense_t = quant.dequantize(qweight, scales), quant.dequantize(qdown, sdown).T
    for got, rounded, fp32 in (
        (y, quant.quantized_activations(x) @ dense.T, x @ dense.T),
        (out, quant.quantized_activations(y) @ dense_t, y @ dense_t),
    ):
        top = fp32.abs().max()
        assert (got - rounded).abs().max() < 1e-5 * top
        assert (got - fp32).abs().max() > 1e-4 * top
    x[0, 40] = float("nan")  # block 1 of x; of y, block 0 (neurons 0-31)
    assert cpu_kernel.slot_matvec(x, qweight, *every, 32, 0, scales).isnan().all()
    y[0, 5] = float("nan")
    assert cpu_kernel.slot_matvec_t(y, rows_t, *every, 32, scales_t, hidden).isnan().all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kernels_take_bf16_activations_and_a_fused_offset(bits):
    from lte_kernels import quant

    g = torch.Generator().manual_seed(8)
    weight = torch.randn(2 * 128, 64, generator=g)  # two fused chunks of 128 neurons
    qweight, scales = quant.quantize(weight, bits)
    dense = quant.dequantize(qweight, scales)
    x = torch.randn(2, 64, generator=g).bfloat16()
    experts = torch.tensor([1, 3])
    rows = 128 + (experts[:, None] * 32 + torch.arange(32)).reshape(-1)
    y = cpu_kernel.expert_matvec(x, qweight, experts, 32, 128, scales)
    assert y.dtype == torch.bfloat16
    _close(y, quant.quantized_activations(x) @ dense[rows].T, 1e-2)


def test_quantized_kernels_refuse_mismatched_inputs_by_name():
    from lte_kernels import quant

    qweight, scales = quant.quantize(torch.randn(64, 64), 8)
    x, experts = torch.randn(64), torch.tensor([0])
    with pytest.raises(RuntimeError, match="straddle two experts"):
        cpu_kernel.expert_matvec(x, qweight, experts, 16, 0, scales)
    with pytest.raises(RuntimeError, match="pass its fp16 scales"):
        cpu_kernel.expert_matvec(x, qweight, experts, 32)
    with pytest.raises(RuntimeError, match="scales are for int8"):
        cpu_kernel.expert_matvec(x, torch.randn(64, 64), experts, 32, 0, scales)
    with pytest.raises(RuntimeError, match="do not fit 10"):
        cpu_kernel.expert_matvec(torch.randn(10), qweight, experts, 32, 0, scales)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kernels_are_custom_ops_that_compilers_trace(bits):
    from lte_kernels import quant

    g = torch.Generator().manual_seed(9)
    qweight, scales = quant.quantize(torch.randn(128, 40, generator=g), bits)
    qweight_t, scales_t = quant.quantize(torch.randn(128, 40, generator=g), bits)
    x = torch.randn(2, 40, generator=g)
    order, count = cpu_kernel.select_experts(torch.tensor([True, False, True, False]))
    experts = torch.tensor([0, 2])
    cases = [
        (cpu_kernel._op_matvec, (x, qweight, experts, 32, 0, scales)),
        (cpu_kernel._op_matvec_t, (torch.randn(2, 64, generator=g), qweight_t, experts, 32, scales_t, 40)),
        (cpu_kernel._op_slot, (x, qweight, order, count, 32, 0, scales)),
        (cpu_kernel._op_slot_t, (torch.randn(2, 128, generator=g), qweight_t, order, count, 32, scales_t, 40)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)

    def step(x):
        h = torch.relu(cpu_kernel.slot_matvec(x, qweight, order, count, 32, 0, scales))
        return cpu_kernel.slot_matvec_t(h, qweight_t, order, count, 32, scales_t, 40)

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x))


def test_a_build_lock_left_by_an_interrupted_build_is_named_then_removed(tmp_path, monkeypatch, caplog):
    """torch's build lock would make every later load wait forever for it, silently."""
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - cpu_kernel.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="lte"):
        cpu_kernel._wait_for_build_lock(str(tmp_path))
    assert not lock.exists() and "left by an interrupted build" in caplog.text
    lock.touch()  # a fresh lock: another process may be building; wait (here 1 s), say so, then remove it
    monkeypatch.setattr(cpu_kernel, "STALE_LOCK_S", 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lte"):
        cpu_kernel._wait_for_build_lock(str(tmp_path))
    assert not lock.exists() and "waiting for another process's build" in caplog.text
    cpu_kernel._wait_for_build_lock(str(tmp_path))  # no lock: nothing to do


@pytest.mark.parametrize(
    "size", [32, 6]
)  # 32: int8 blocks of h (32 rows of a scale block); 6: fp32 h, one row at a time
@pytest.mark.parametrize("bits", [8, 4])
def test_the_transposed_products_read_a_weight_grouped_along_its_inputs_without_rounding_again(bits, size):
    """A [hidden, neurons] down projection quantized along the neurons (compressed-tensors' layout), read one
    row per neuron with one scale per (32 neurons, column): the stored values exactly, no second rounding."""
    from lte_kernels import quant

    hidden, neurons, tokens = 100, 192, 3
    g = torch.Generator().manual_seed(8)
    qweight, scales = quant.quantize(torch.randn(hidden, neurons, generator=g), bits)
    q = quant.unpack(qweight, scales)
    rows, column_scales = quant.transposed(q, scales, bits)
    assert rows.shape == (neurons, 128 * bits // 8) and column_scales.shape == (neurons // 32, 128)
    stored = quant.dequantize(qweight, scales).T  # [neurons, hidden], what every dense loader computes
    on = torch.rand(tokens, neurons // size, generator=g) >= 0.5
    order, count = cpu_kernel.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    selected = (union[:, None] * size + torch.arange(size)).reshape(-1)
    h = torch.zeros(tokens, neurons)
    h[:, : selected.numel()] = torch.randn(tokens, selected.numel(), generator=g)
    out = cpu_kernel.slot_matvec_t(h, rows, order, count, size, column_scales, hidden)
    h_read = quant.quantized_activations(h) if size % 32 == 0 else h  # an expert of 6 rows splits a scale block
    _close(out, h_read[:, : selected.numel()] @ stored[selected], 1e-5)
    with pytest.raises(RuntimeError, match="transposed product"):  # row-block scales read only transposed
        cpu_kernel.slot_matvec(torch.randn(1, 128), rows, order, count, size, 0, column_scales)
