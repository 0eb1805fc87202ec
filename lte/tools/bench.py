"""``lte bench kernel`` and ``lte bench decode``: sparse against dense, in one process.

``kernel``:

Dense is computed the way transformers computes a SwiGLU FFN (three ``F.linear`` calls);
sparse is what an exported model runs for one decoding token: the router matvec, the
threshold, the selection, then the kernel's expert matvecs for gate and up and the transposed
one for down (``kernels/cpu.py`` on CPU; ``kernels/triton_ffn.py`` on CUDA, both sides replayed
from CUDA graphs). Times are medians over repeats after warm-up; the sparse output is checked
against the masked dense FFN before it is timed. The threshold is set so that exactly the
requested share of experts is skipped. Each row also says what share of the device's measured
read bandwidth each side reaches (bytes it must read / time).

``--dtype int8|int4`` (CPU): the sparse side reads group-quantized rows (``lte_kernels.quant``: group
32, fp16 scales, bf16 activations); dense is the best dense GEMV of the same bit width in torch here,
``aten._weight_int8pack_mm`` (per-channel scales) and ``aten._weight_int4pack_mm_for_cpu`` (group 32),
with bf16 activations (their fp32-activation paths are several times slower on this CPU).

``decode``: end-to-end greedy tokens/s of an exported model at batch 1, against the same
loaded model with ``config.lte_routing = "dense"``: same prompt, same number of new tokens.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import UsageError
from ..model.layers import threshold_skipping

DEFAULT_SHAPES = ("4096x11008", "5120x13824")  # Llama-2-7B and 13B FFNs
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = {"int8": 8, "int4": 4}  # weight-only, group 32, fp16 scales (lte_kernels.quant); bf16 activations


@dataclass
class KernelRow:
    shape: str
    batch: int
    dtype: str
    sparsity: float
    dense_ms: float
    sparse_ms: float
    speedup: float
    ideal_speedup: float
    fraction_of_ideal: float
    kernel_dense_ms: float  # the same kernel with every expert selected: separates kernel quality from sparsity
    union: float  # share of experts the batch's tokens selected together (= 1 - sparsity at batch 1)
    max_error: float  # sparse output against the masked dense FFN, relative to its largest entry
    sparse_of_bandwidth: float  # bytes the sparse step reads / its time, as a share of read_bandwidth
    dense_of_bandwidth: float
    bandwidth_gb_s: float  # the device's measured read bandwidth (read_bandwidth)
    launch: str  # "cuda graphs" (both sides replayed from captured graphs) or "eager"
    baseline: str = "F.linear"  # the dense kernel the sparse side is measured against


def check_error(error: float, tolerance: float, shape: str, sparsity: float) -> None:
    """Refuse to time a sparse step whose output is wrong (NaN included)."""
    if not error <= tolerance:
        raise RuntimeError(
            f"{shape} at {sparsity:.0%}: the sparse kernel's output is {error:.2e} (relative) from the masked "
            f"dense FFN, above {tolerance:g}; a wrong kernel is not timed"
        )


def measured_row(case: dict, times_ms: tuple, union: float, error: float, bytes_read: tuple, bandwidth: float, **kw):
    """A :class:`KernelRow` from what was measured: ``times_ms`` (dense, sparse, kernel with every expert),
    ``bytes_read`` (sparse, dense); the speedup, ideal and bandwidth shares are derived here."""
    dense_ms, sparse_ms, kernel_dense_ms = times_ms
    ideal = 1.0 / union if union > 0 else float("inf")  # bytes read: the union of the experts
    speedup = dense_ms / sparse_ms
    return KernelRow(
        **case,
        dense_ms=dense_ms,
        sparse_ms=sparse_ms,
        speedup=speedup,
        ideal_speedup=ideal,
        fraction_of_ideal=speedup / ideal,
        kernel_dense_ms=kernel_dense_ms,
        union=union,
        max_error=error,
        sparse_of_bandwidth=bytes_read[0] / (sparse_ms / 1e3) / bandwidth,
        dense_of_bandwidth=bytes_read[1] / (dense_ms / 1e3) / bandwidth,
        bandwidth_gb_s=bandwidth / 1e9,
        **kw,
    )


def parse_shape(text: str) -> tuple[int, int]:
    try:
        hidden, ffn = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--shape {text!r}: expected HIDDENxFFN, e.g. 4096x11008") from None
    if hidden <= 0 or ffn <= 0:
        raise UsageError(f"--shape {text!r}: sizes must be positive")
    return hidden, ffn


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall-clock time of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_counting_skips(model, fn):
    """Call ``fn`` while an exported model counts the experts each layer skips; returns
    (fn's result, per-layer fraction skipped; 0 for layers that routed nothing, as with dense routing)."""
    model.config.lte_track_sparsity = True
    model.lte_reset_sparsity()
    try:
        result = fn()
    finally:
        model.config.lte_track_sparsity = False
    return result, [s or 0.0 for s in model.lte_sparsity()]


def median_graph_seconds(fn, repeats: int, replays: int = 50) -> float:
    """Median time of one call of ``fn`` replayed from a captured CUDA graph: a decode step as
    vLLM and ``torch.compile(mode="reduce-overhead")`` run it, without per-launch host overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: compiles the Triton kernels
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / replays)
    return statistics.median(times)


def read_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes/s this device reads in a plain reduction over a large buffer (256 MiB on CPU, 2 GiB
    on GPU, past every cache): the practical bandwidth limit a memory-bound kernel is held to."""
    size = (2 << 30) if device.type == "cuda" else (256 << 20)
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
    seconds = median_seconds(buffer.sum, repeats, device)
    return size / seconds


def _slot_kernels(device: torch.device, force_triton: bool):
    """(select, matvec, matvec_t) with the selection as device tensors, as an export's decode step
    runs them: the Triton kernels on CUDA (or forced, under TRITON_INTERPRET=1), else the C++ ones."""
    if device.type == "cuda" or force_triton:
        import lte_kernels.triton_ffn as triton_kernel

        if not triton_kernel.available():
            raise UsageError("--device cuda needs triton (`pip install triton`)")
        return triton_kernel.select_experts, triton_kernel.expert_matvec, triton_kernel.expert_matvec_t
    import lte_kernels.cpu as cpu_kernel

    if not cpu_kernel.available():
        raise UsageError("the CPU kernel could not be built (it needs a C++ compiler and ninja); see the log above")
    return cpu_kernel.select_experts, cpu_kernel.slot_matvec, cpu_kernel.slot_matvec_t


@torch.no_grad()
def bench_kernel(
    shapes,
    sparsities,
    dtype: str = "float32",
    batch: int = 1,
    expert_size: int = 32,
    repeats: int = 20,
    device: str = "cpu",
    progress: bool = True,
) -> list[KernelRow]:
    """One FFN decode step, sparse against dense. On CPU the sparse side is the C++ kernel with
    an index selection; on CUDA the Triton kernels with the selection on the device (no host
    synchronisation), both sides captured in CUDA graphs. ``LTE_FORCE_TRITON=1`` runs the Triton
    side on CPU tensors (under ``TRITON_INTERPRET=1``: correctness, not speed)."""
    import os

    from tqdm.auto import tqdm

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    if not 1 <= batch <= 8:
        raise UsageError(
            f"--batch {batch}: the sparse kernels cover 1 to 8 tokens (larger batches run the dense masked path)"
        )
    slot_path = torch_device.type == "cuda" or os.environ.get("LTE_FORCE_TRITON") == "1"
    if not slot_path and dtype == "float16":
        raise UsageError("--dtype float16: the CPU kernel reads float32 and bfloat16 weights (float16 is for CUDA)")
    if dtype in QUANTIZED:
        if slot_path:
            raise UsageError(
                f"--dtype {dtype}: quantized weights are benchmarked on CPU only for now; use --device cpu"
            )
        if batch != 1:
            raise UsageError(
                f"--dtype {dtype}: the quantized benchmark is batch 1 (torch's dense int kernels are GEMVs)"
            )
        return _bench_quantized(shapes, sparsities, dtype, expert_size, repeats, progress)
    select, matvec, matvec_t = _slot_kernels(torch_device, slot_path)
    if not slot_path:
        import lte_kernels.cpu as cpu_kernel
    graphs = torch_device.type == "cuda"
    timer = median_graph_seconds if graphs else lambda fn, n: median_seconds(fn, n, torch_device)
    bandwidth = read_bandwidth(torch_device)
    torch_dtype = DTYPES[dtype]
    rows = []
    cases = [(s, p) for s in shapes for p in sparsities]
    for shape, sparsity in tqdm(cases, desc="Benchmarking", disable=not progress):
        hidden, ffn = parse_shape(shape)
        if ffn % expert_size:
            raise UsageError(f"--expert-size {expert_size} does not divide the FFN width {ffn}")
        experts_total = ffn // expert_size
        g = torch.Generator().manual_seed(0)
        gate, up = (torch.randn(ffn, hidden, generator=g).to(torch_dtype).to(torch_device) for _ in range(2))
        down = torch.randn(hidden, ffn, generator=g).to(torch_dtype).to(torch_device)
        down_t = down.t().contiguous()  # the export's layout: one row per neuron
        # fp32 router (logits ~ N(0, 1)): bf16 scores tie too often to skip an exact share of experts
        router = (torch.randn(experts_total, hidden, generator=g) / hidden**0.5).to(torch_device)
        x = torch.randn(batch, hidden, generator=g).to(torch_dtype).to(torch_device)
        scores = torch.sigmoid(F.linear(x.float(), router)).reshape(-1)
        skip = round(sparsity * scores.numel())  # over all tokens: each skips about this share
        threshold = threshold_skipping(scores.cpu(), skip) if skip else -1.0

        def dense(x=x, gate=gate, up=up, down=down):  # defaults: this iteration's tensors
            return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

        def route(x=x, router=router, threshold=threshold):
            return torch.sigmoid(F.linear(x.float(), router)) > threshold

        if slot_path:  # what an export's decode step runs on CUDA: fixed shapes, selection on the device

            def sparse(x=x, gate=gate, up=up, down_t=down_t):
                on = route(x)
                order, count = select(on)
                h = F.silu(matvec(x, gate, order, count, expert_size)) * matvec(x, up, order, count, expert_size)
                if batch > 1:  # zero each token's experts it did not select (slot order)
                    keep = on[:, order.long()].unsqueeze(-1).to(h.dtype)
                    h = (h.reshape(batch, -1, expert_size) * keep).reshape(batch, -1)
                return matvec_t(h, down_t, order, count, expert_size)

            def kernel_dense(x=x, gate=gate, up=up, down_t=down_t, experts_total=experts_total):
                order = torch.arange(experts_total, dtype=torch.int32, device=x.device)
                count = torch.full((1,), experts_total, dtype=torch.int32, device=x.device)
                h = F.silu(matvec(x, gate, order, count, expert_size)) * matvec(x, up, order, count, expert_size)
                return matvec_t(h, down_t, order, count, expert_size)

        else:  # what an export's FFN runs for 1 to 8 tokens on CPU

            def sparse(x=x, gate=gate, up=up, down_t=down_t):
                on = route(x)
                experts = on.any(dim=0).nonzero().squeeze(1)
                g_ = cpu_kernel.expert_matvec(x, gate, experts, expert_size)
                u_ = cpu_kernel.expert_matvec(x, up, experts, expert_size)
                h = F.silu(g_) * u_
                if batch > 1:  # zero each token's experts it did not select
                    h = (h.reshape(batch, -1, expert_size) * on[:, experts].unsqueeze(-1).to(h.dtype)).reshape(
                        batch, -1
                    )
                return cpu_kernel.expert_matvec_t(h, down_t, experts, expert_size)

            all_experts = torch.arange(experts_total)

            def kernel_dense(x=x, gate=gate, up=up, down_t=down_t, all_experts=all_experts):
                g_ = cpu_kernel.expert_matvec(x, gate, all_experts, expert_size)
                u_ = cpu_kernel.expert_matvec(x, up, all_experts, expert_size)
                return cpu_kernel.expert_matvec_t(F.silu(g_) * u_, down_t, all_experts, expert_size)

        on = route()
        assert int(on.sum()) == on.numel() - skip, (int(on.sum()), on.numel(), skip)
        # Check before timing: the sparse step must compute the masked dense FFN (no timing of a wrong kernel).
        mask = on.repeat_interleave(expert_size, dim=1).to(torch_dtype)
        reference = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up) * mask, down).float()
        error = float((sparse().float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
        check_error(error, 1e-4 if torch_dtype == torch.float32 else 3e-2, shape, sparsity)
        union = float(on.any(dim=0).float().mean())
        times = tuple(1e3 * timer(fn, repeats) for fn in (dense, sparse, kernel_dense))
        dense_bytes = 3 * hidden * ffn * gate.element_size()
        sparse_bytes = union * dense_bytes + router.numel() * router.element_size()
        case = dict(shape=shape, batch=batch, dtype=dtype, sparsity=sparsity)
        launch = "cuda graphs" if graphs else "eager"
        rows.append(measured_row(case, times, union, error, (sparse_bytes, dense_bytes), bandwidth, launch=launch))
    return rows


def _int_baseline(weight: torch.Tensor, bits: int):
    """(fn(x) -> x @ weight.T in bf16, its name): torch's dense int8 / int4 GEMV for CPU on ``weight``."""
    rows, hidden = weight.shape
    if bits == 8:
        scales = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
        q = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        scales = scales.to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)), "aten._weight_int8pack_mm"
    group = 32
    w = weight.reshape(rows, hidden // group, group)
    scales = w.abs().amax(dim=-1).clamp_min(1e-8) / 7
    q = ((w / scales[..., None]).round().clamp(-8, 7) + 8).to(torch.int32).reshape(rows, hidden)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # [groups, rows, (scale, zero)]: the op dequantizes (q - 8) * scale + zero
    scale_zero = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous().to(torch.bfloat16)
    return (
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)
    ), "aten._weight_int4pack_mm_for_cpu"


@torch.no_grad()
def _bench_quantized(shapes, sparsities, dtype: str, expert_size: int, repeats: int, progress: bool):
    """``bench_kernel`` for int8/int4 weights on CPU: the kernel over quantized rows (slot selection, as an
    export's decode step) against torch's dense int GEMVs of the same bit width; batch 1, bf16 activations."""
    from tqdm.auto import tqdm

    import lte_kernels.cpu as cpu_kernel
    from lte_kernels import quant

    if not cpu_kernel.available():
        raise UsageError("the CPU kernel could not be built (it needs a C++ compiler and ninja); see the log above")
    bits = QUANTIZED[dtype]
    try:
        quant.check_group_size(quant.GROUP_SIZE, expert_size)
    except ValueError as exc:
        raise UsageError(f"--expert-size {expert_size}: {exc}") from None
    bandwidth = read_bandwidth(torch.device("cpu"))
    timer = median_seconds
    rows = []
    for shape, sparsity in tqdm(
        [(s, p) for s in shapes for p in sparsities], desc="Benchmarking", disable=not progress
    ):
        hidden, ffn = parse_shape(shape)
        if ffn % expert_size or hidden % quant.GROUP_SIZE:
            raise UsageError(
                f"--shape {shape}: --expert-size {expert_size} does not divide the FFN width {ffn}, or the group "
                f"size {quant.GROUP_SIZE} does not divide the hidden size {hidden}"
            )
        experts_total = ffn // expert_size
        g = torch.Generator().manual_seed(0)
        gate, up = (torch.randn(ffn, hidden, generator=g) for _ in range(2))
        down = torch.randn(hidden, ffn, generator=g)
        router = torch.randn(experts_total, hidden, generator=g) / hidden**0.5
        x = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
        (qg, sg), (qu, su), (qd_stored, sd_stored) = (quant.quantize(w, bits) for w in (gate, up, down))
        # the down projection as `lte export --quantize` stores it (groups of 32 neurons), read transposed
        qd, sd = quant.transposed(quant.unpack(qd_stored, sd_stored), sd_stored, bits)
        (dense_gate, name), (dense_up, _), (dense_down, _) = (_int_baseline(w, bits) for w in (gate, up, down))
        scores = torch.sigmoid(F.linear(x.float(), router)).reshape(-1)
        skip = round(sparsity * scores.numel())
        threshold = threshold_skipping(scores, skip) if skip else -1.0

        def dense(x=x, dense_gate=dense_gate, dense_up=dense_up, dense_down=dense_down):
            return dense_down(F.silu(dense_gate(x)) * dense_up(x))

        def sparse(x=x, router=router, threshold=threshold, qg=qg, sg=sg, qu=qu, su=su, qd=qd, sd=sd, hidden=hidden):
            order, count = cpu_kernel.select_experts(torch.sigmoid(F.linear(x.float(), router)) > threshold)
            h = F.silu(cpu_kernel.slot_matvec(x, qg, order, count, expert_size, 0, sg))
            h = h * cpu_kernel.slot_matvec(x, qu, order, count, expert_size, 0, su)
            return cpu_kernel.slot_matvec_t(h, qd, order, count, expert_size, sd, hidden)

        every = (torch.arange(experts_total, dtype=torch.int32), torch.tensor([experts_total], dtype=torch.int32))

        def kernel_dense(x=x, qg=qg, sg=sg, qu=qu, su=su, qd=qd, sd=sd, every=every, hidden=hidden):
            h = F.silu(cpu_kernel.slot_matvec(x, qg, *every, expert_size, 0, sg))
            h = h * cpu_kernel.slot_matvec(x, qu, *every, expert_size, 0, su)
            return cpu_kernel.slot_matvec_t(h, qd, *every, expert_size, sd, hidden)

        on = torch.sigmoid(F.linear(x.float(), router)) > threshold
        assert int(on.sum()) == on.numel() - skip, (int(on.sum()), on.numel(), skip)
        # Check before timing: the sparse step computes the masked FFN of the dequantized weights, and the
        # baseline the dense FFN of its own quantization of the same weights (a loose check: another rounding).
        mask = on.repeat_interleave(expert_size, dim=1).float()
        wg, wu = (quant.dequantize(q_, s_) for q_, s_ in ((qg, sg), (qu, su)))
        wd = quant.dequantize(qd_stored, sd_stored).T
        xf = x.float()
        reference = ((F.silu(xf @ wg.T) * (xf @ wu.T) * mask) @ wd).float()
        error = float((sparse().float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
        full = F.silu(xf @ gate.T) * (xf @ up.T) @ down.T
        baseline_error = float((dense().float() - full).abs().max() / full.abs().max())
        assert baseline_error < (0.05 if bits == 8 else 0.5), (name, baseline_error)
        check_error(error, 3e-2, shape, sparsity)  # the kernel reads the reference's own quantized values
        union = float(on.float().mean())
        times = tuple(1e3 * timer(fn, repeats) for fn in (dense, sparse, kernel_dense))
        weight_bytes = 3 * hidden * ffn * quant.bits_per_weight(bits) / 8  # both sides read about this much
        sparse_bytes = union * weight_bytes + router.numel() * router.element_size()
        case = dict(shape=shape, batch=1, dtype=dtype, sparsity=sparsity)
        bytes_read = (sparse_bytes, weight_bytes)
        rows.append(measured_row(case, times, union, error, bytes_read, bandwidth, launch="eager", baseline=name))
    return rows


def kernel_table(rows: list[KernelRow]) -> str:
    lines = [
        (
            "| shape | batch | dtype | sparsity | union | dense ms | sparse ms | speedup | ideal | of ideal "
            "| kernel, all experts ms | sparse, of bandwidth | dense, of bandwidth | dense kernel |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.batch} | {r.dtype} | {r.sparsity:.2f} | {100 * r.union:.0f}% | {r.dense_ms:.2f} | "
            f"{r.sparse_ms:.2f} | {r.speedup:.2f}x | {r.ideal_speedup:.2f}x | {100 * r.fraction_of_ideal:.0f}% | "
            f"{r.kernel_dense_ms:.2f} | {100 * r.sparse_of_bandwidth:.0f}% | {100 * r.dense_of_bandwidth:.0f}% | "
            f"{r.baseline} |"
        )
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_json(data, path: str) -> None:
    """``data`` as JSON at ``path``, written to a temporary file and renamed into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)


@dataclass
class DecodeResult:
    model: str
    device: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    repeats: int
    dense_tokens_per_s: float
    sparse_tokens_per_s: float
    speedup: float
    sparsity: float  # FFN neurons skipped per token while decoding, mean over layers


def set_export_routing(config, routing: str) -> str:
    """Set an exported model's routing (``"hard"`` or ``"dense"``); returns the previous one. An export
    written before the rename carries remote code that reads ``lte_mode`` (``"sparse"`` or ``"dense"``)."""
    if "lte_mode" in vars(config):
        previous = "hard" if config.lte_mode == "sparse" else config.lte_mode
        config.lte_mode = "sparse" if routing == "hard" else routing
        return previous
    previous, config.lte_routing = config.lte_routing, routing
    return previous


@torch.no_grad()
def bench_decode(model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int = 5, name: str = "") -> DecodeResult:
    """Median greedy-decoding speed of ``model`` (an exported LTE model) sparse and dense."""
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": model.config.pad_token_id or 0,
    }

    def decode():
        model.generate(prompt_ids, **kwargs)

    device = next(model.parameters()).device
    speed = {}
    for key, routing in (("dense", "dense"), ("sparse", "hard")):
        set_export_routing(model.config, routing)
        speed[key] = new_tokens / median_seconds(decode, repeats, device)
    set_export_routing(model.config, "hard")
    _, per_layer = run_counting_skips(model, decode)
    return DecodeResult(
        name,
        machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
        str(next(model.parameters()).dtype).replace("torch.", ""),
        prompt_ids.shape[1],
        new_tokens,
        repeats,
        speed["dense"],
        speed["sparse"],
        speed["sparse"] / speed["dense"],
        sum(per_layer) / len(per_layer),
    )
