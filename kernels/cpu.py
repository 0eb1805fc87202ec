"""CPU kernels for batch-1 sparse FFN decoding over expert-contiguous weights.

Two memory-bound matrix-vector products that read only the selected experts' rows:

* ``expert_matvec(x, weight, experts, expert_size, offset=0)``: ``y = x @ weight[rows].T`` for
  the rows of the selected experts (a first projection: gate, up, or the input projection),
  ``weight`` [neurons, hidden] row-major; ``x`` is one token or a few (each row is read once
  for all of them); returns [tokens, k * expert_size].
* ``expert_matvec_t(h, weight_t, experts, expert_size)``: ``out = h @ weight_t[rows]`` (the
  down projection stored transposed, one row per neuron); returns [tokens, hidden].

For a few tokens, pass the union of their selected experts and zero each token's entries of
``h`` for the experts it did not select.

``slot_matvec`` / ``slot_matvec_t`` are the same products with the selection given as the
Triton kernels take it (``order``: every expert, the selected ones first; ``count``: how many
are selected, a one-element tensor): the output of ``slot_matvec`` has a slot for every expert,
zero past the selected ones. Their shapes never depend on the selection, so a decode step that
uses them traces into one graph (``torch.compile(fullgraph=True)``, ``torch.export``).

All four are registered torch custom ops (``torch.library.custom_op``, namespace
``lte_<hash>``) with fake implementations, so compilers trace through them.

Both are C++ loops parallelised with ATen's thread pool (``at::parallel_for``): the first over
the selected rows, the second over one column block per thread, so no thread ever writes
another's output (no atomics, a fixed summation order). A thread gets at least 2^16
multiply-adds: a small model's FFN (64 x 172) stays on one thread, since waking a second one costs
more than the work (on a busy 2-core CPU, 35 ms instead of 0.3 ms per routed FFN). Weights are read
in place; no gather copy. fp32 and bf16 weights, fp32 accumulation.

The C++ source is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++
compiler and ninja are needed; about 20 s, logged once). The extension's name carries a hash
of the source, the flags, the torch version and the instruction set it is compiled for, so
environments sharing the extensions cache reuse each other's builds instead of rebuilding over
them, and a cache shared between machines (a network home) never hands one CPU's ``-march=native``
build (AVX-512, say) to another that lacks its instructions (SIGILL). ``LTE_KERNEL_ISA=portable``
compiles without ``-march=native`` (the architecture's baseline, its own build) for such caches
or unknown CPUs. If it cannot be built,
:func:`available` is False and callers use their pure-torch path. Imports only torch: this
file is copied next to an exported model's ``modeling_lte.py``.
"""

import hashlib
import logging
import os
import platform
import threading

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

static inline float load(const float* p, int64_t i) { return p[i]; }
static inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;  // bf16 -> fp32 is a shift
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Multiply-adds below which a thread is not worth waking: a small model's FFN (64 x 172) is a few
// microseconds of work, and handing half of it to a second thread costs more, far more on a busy CPU.
static constexpr int64_t kMinWork = 1 << 16;
static inline int64_t grain(int64_t work_per_item, int64_t at_least) {
  return std::max<int64_t>(at_least, kMinWork / std::max<int64_t>(1, work_per_item));
}

template <typename W>
static void matvec_rows(const float* x, int64_t tokens, const W* weight, const int64_t* experts, int64_t k,
                        int64_t size, int64_t offset, int64_t hidden, float* y, int64_t ystride) {
  // y[t, j] = row_j . x[t]: each selected row is read once for all tokens; rows split across threads.
  const int64_t n = k * size;
  at::parallel_for(0, n, grain(hidden * tokens, 8), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const W* row = weight + (offset + experts[j / size] * size + j % size) * hidden;
      for (int64_t t = 0; t < tokens; ++t) {
        const float* xt = x + t * hidden;
        float lanes[16] = {0.f};  // independent partial sums: the compiler vectorises the loop
        int64_t c = 0;
        for (; c + 16 <= hidden; c += 16)
          for (int l = 0; l < 16; ++l) lanes[l] += load(row, c + l) * xt[c + l];
        float acc = 0.f;
        for (; c < hidden; ++c) acc += load(row, c) * xt[c];
        for (int l = 0; l < 16; ++l) acc += lanes[l];
        y[t * ystride + j] = acc;
      }
    }
  });
}

template <typename W>
static void matvec_t_rows(const float* h, int64_t hstride, int64_t tokens, const W* weight_t, const int64_t* experts,
                          int64_t k, int64_t size, int64_t hidden, float* out) {
  // out[t, c] = sum_j h[t, j] * row_j[c]. Each thread owns one contiguous column block and streams
  // every selected row's slice of it once for all tokens: no shared writes, a fixed sum order.
  const int64_t n = k * size;
  const int64_t threads =
      std::min(std::max<int64_t>(1, at::get_num_threads()), std::max<int64_t>(1, n * hidden * tokens / kMinWork));
  const int64_t block = ((hidden + threads - 1) / threads + 15) / 16 * 16;
  at::parallel_for(0, (hidden + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block, c1 = std::min(hidden, c0 + block), width = c1 - c0;
      std::vector<float> acc(tokens * width, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const W* row = weight_t + (experts[j / size] * size + j % size) * hidden + c0;
        for (int64_t t = 0; t < tokens; ++t) {
          const float s = h[t * hstride + j];
          if (s == 0.f) continue;  // a token that did not select this expert
          float* a = acc.data() + t * width;
          for (int64_t c = 0; c < width; ++c) a[c] += s * load(row, c);
        }
      }
      for (int64_t t = 0; t < tokens; ++t)
        std::copy(acc.begin() + t * width, acc.begin() + (t + 1) * width, out + t * hidden + c0);
    }
  });
}

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16");
}

static torch::Tensor rows_times(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& ids,
                                int64_t k, int64_t size, int64_t offset, int64_t width) {
  // [tokens, width] (fp32): the first k * size columns are x times the rows of the first k experts of ids, the rest 0.
  check(weight, "weight");
  const int64_t hidden = weight.size(1);
  auto xf = x.reshape({-1, hidden}).to(torch::kFloat).contiguous();
  const int64_t tokens = xf.size(0);
  auto y = k * size == width ? torch::empty({tokens, width}, xf.options())
                             : torch::zeros({tokens, width}, xf.options());
  if (weight.scalar_type() == torch::kFloat)
    matvec_rows(xf.data_ptr<float>(), tokens, weight.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size, offset,
                hidden, y.data_ptr<float>(), width);
  else
    matvec_rows(xf.data_ptr<float>(), tokens, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                ids.data_ptr<int64_t>(), k, size, offset, hidden, y.data_ptr<float>(), width);
  return y;
}

static torch::Tensor rows_t_times(const torch::Tensor& h, int64_t width, const torch::Tensor& weight_t,
                                  const torch::Tensor& ids, int64_t k, int64_t size) {
  // [tokens, hidden] (fp32): h's first k * size columns (of width) times the rows of the first k experts of ids.
  check(weight_t, "weight_t");
  const int64_t hidden = weight_t.size(1);
  int64_t tokens = 1;  // every dimension but the last (which may be 0 when no expert is selected)
  for (int64_t d = 0; d + 1 < h.dim(); ++d) tokens *= h.size(d);
  TORCH_CHECK(h.numel() == tokens * width, "h has ", h.numel(), " entries for ", tokens, " tokens x ", width);
  auto hf = h.reshape({tokens, width}).to(torch::kFloat).contiguous();
  auto out = torch::empty({tokens, hidden}, hf.options());
  if (weight_t.scalar_type() == torch::kFloat)
    matvec_t_rows(hf.data_ptr<float>(), width, tokens, weight_t.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size,
                  hidden, out.data_ptr<float>());
  else
    matvec_t_rows(hf.data_ptr<float>(), width, tokens,
                  reinterpret_cast<const uint16_t*>(weight_t.data_ptr<at::BFloat16>()), ids.data_ptr<int64_t>(), k,
                  size, hidden, out.data_ptr<float>());
  return out;
}

// x: [tokens, hidden] (or [hidden]); returns [tokens, k * size] in weight's dtype.
torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor experts, int64_t size,
                            int64_t offset) {
  auto ids = experts.to(torch::kLong).contiguous();
  return rows_times(x, weight, ids, ids.numel(), size, offset, ids.numel() * size).to(weight.scalar_type());
}

// h: [tokens, k * size] (or [k * size]); returns [tokens, hidden] in weight_t's dtype.
torch::Tensor expert_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor experts, int64_t size) {
  auto ids = experts.to(torch::kLong).contiguous();
  return rows_t_times(h, ids.numel() * size, weight_t, ids, ids.numel(), size).to(weight_t.scalar_type());
}

static int64_t selected(const torch::Tensor& order, const torch::Tensor& count) {
  const int64_t k = count.to(torch::kLong).item<int64_t>();
  TORCH_CHECK(0 <= k && k <= order.numel(), "count ", k, " outside [0, ", order.numel(), "]");
  return k;
}

// Slots: x [tokens, hidden] -> [tokens, order.numel() * size], the count selected slots first, zeros after.
torch::Tensor slot_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor order, torch::Tensor count, int64_t size,
                          int64_t offset) {
  auto ids = order.to(torch::kLong).contiguous();
  return rows_times(x, weight, ids, selected(ids, count), size, offset, ids.numel() * size).to(weight.scalar_type());
}

// Slots: h [tokens, order.numel() * size] (selected slots first) -> [tokens, hidden].
torch::Tensor slot_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor order, torch::Tensor count,
                            int64_t size) {
  auto ids = order.to(torch::kLong).contiguous();
  return rows_t_times(h, ids.numel() * size, weight_t, ids, selected(ids, count), size).to(weight_t.scalar_type());
}
"""

_FUNCTIONS = ["expert_matvec", "expert_matvec_t", "slot_matvec", "slot_matvec_t"]
_ISA = os.environ.get("LTE_KERNEL_ISA", "native")
if _ISA not in ("native", "portable"):  # a typo must not break every export's import: the safe build, said once
    logger.warning(
        "LTE_KERNEL_ISA=%r: expected 'native' (the default: this CPU's instructions) or 'portable' (the "
        "architecture's baseline, for a build cache shared between different CPUs); building the portable kernel",
        _ISA,
    )
    _ISA = "portable"
# The architecture's baseline named explicitly: a compiler whose default targets a newer level would emit it.
_BASELINE = {"x86_64": "-march=x86-64", "AMD64": "-march=x86-64", "aarch64": "-march=armv8-a"}
_CFLAGS = [
    "-O3",
    *(["-march=native"] if _ISA == "native" else [_BASELINE[m]] if (m := platform.machine()) in _BASELINE else []),
    "-fopenmp",
]
_LDFLAGS = ["-fopenmp"]
# One build per (source, flags, torch): a changed kernel or another torch gets its own name.
_HASH = hashlib.sha256("\0".join([_SOURCE, *_CFLAGS, *_LDFLAGS, torch.__version__]).encode()).hexdigest()[:12]
_NAMESPACE = f"lte_{_HASH}"  # custom ops; two copies of this file (project and export) share them


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What ``-march=native`` compiles for: the first CPU's feature flags as the OS reports them (Linux:
    the ``flags`` line on x86, ``Features`` on Arm, ``isa`` on RISC-V; a few microseconds), else the
    compiler's own view (``-march=native -Q --help=target``, one subprocess at the first build or load)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features", "isa"):
                    return " ".join(sorted(value.split()))
                if not line.strip():  # the first processor's block ended without one
                    break
    except OSError:
        pass
    import subprocess

    compiler = os.environ.get("CXX", "c++")
    try:
        proc = subprocess.run(
            [compiler, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=60
        )
        return proc.stdout if proc.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def isa_key(features: str | None = None) -> str:
    """The instruction set a build is for: ``portable``, or ``native_`` and a hash of the CPU's features."""
    if _ISA == "portable":
        return f"portable_{platform.machine()}"
    features = cpu_features() if features is None else features
    digest = hashlib.sha256("\0".join([platform.machine(), features]).encode()).hexdigest()[:8]
    return f"native_{digest}"


def extension_name(isa: str | None = None) -> str:
    """The extension's name: the source, flags and torch hash and the instruction set (:func:`isa_key`)."""
    return f"lte_cpu_sparse_ffn_{_HASH}_{isa_key() if isa is None else isa}"


_lock = threading.Lock()
_extension = None
_failed = False


def _load():
    global _extension, _failed
    if _extension is not None or _failed:
        return _extension
    with _lock:
        if _extension is None and not _failed:
            if os.environ.get("LTE_DISABLE_CPU_KERNEL"):
                _failed = True
                return None
            try:
                from torch.utils.cpp_extension import _get_build_directory, load_inline

                name = extension_name()
                directory = _get_build_directory(name, verbose=False)
                if not os.path.exists(os.path.join(directory, f"{name}.so")):
                    logger.warning(
                        "LTE: building the CPU sparse kernel %s (once per environment and CPU, about 20 s)", directory
                    )
                _extension = load_inline(
                    name=name,
                    cpp_sources=_SOURCE,
                    functions=_FUNCTIONS,
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, unsupported flags: use the pure-torch path
                logger.warning(
                    "LTE CPU sparse kernel unavailable (%s); using the pure-torch path", str(exc).splitlines()[0]
                )
                _failed = True
    return _extension


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _load() is not None


def _register_ops():
    """The four kernels as ``torch.ops.lte_<hash>.*``, each with a fake (shape-only) implementation."""
    namespace = getattr(torch.ops, _NAMESPACE)
    try:
        return namespace.expert_matvec, namespace.expert_matvec_t, namespace.slot_matvec, namespace.slot_matvec_t
    except (AttributeError, RuntimeError):  # not registered yet in this process
        pass
    from torch.library import custom_op, register_fake

    def tokens_of(t: torch.Tensor, last: int) -> int:
        return t.numel() // last if last else t.shape[:-1].numel()

    @custom_op(f"{_NAMESPACE}::expert_matvec", mutates_args=())
    def op_matvec(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, size: int, offset: int) -> torch.Tensor:
        return _load().expert_matvec(x, weight, experts, size, offset)

    @register_fake(f"{_NAMESPACE}::expert_matvec")
    def _(x, weight, experts, size, offset):
        return weight.new_empty(tokens_of(x, weight.shape[1]), experts.numel() * size)

    @custom_op(f"{_NAMESPACE}::expert_matvec_t", mutates_args=())
    def op_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, experts: torch.Tensor, size: int) -> torch.Tensor:
        return _load().expert_matvec_t(h, weight_t, experts, size)

    @register_fake(f"{_NAMESPACE}::expert_matvec_t")
    def _(h, weight_t, experts, size):
        return weight_t.new_empty(tokens_of(h, experts.numel() * size), weight_t.shape[1])

    @custom_op(f"{_NAMESPACE}::slot_matvec", mutates_args=())
    def op_slot(
        x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, size: int, offset: int
    ) -> torch.Tensor:
        return _load().slot_matvec(x, weight, order, count, size, offset)

    @register_fake(f"{_NAMESPACE}::slot_matvec")
    def _(x, weight, order, count, size, offset):
        return weight.new_empty(tokens_of(x, weight.shape[1]), order.numel() * size)

    @custom_op(f"{_NAMESPACE}::slot_matvec_t", mutates_args=())
    def op_slot_t(
        h: torch.Tensor, weight_t: torch.Tensor, order: torch.Tensor, count: torch.Tensor, size: int
    ) -> torch.Tensor:
        return _load().slot_matvec_t(h, weight_t, order, count, size)

    @register_fake(f"{_NAMESPACE}::slot_matvec_t")
    def _(h, weight_t, order, count, size):
        return weight_t.new_empty(tokens_of(h, order.numel() * size), weight_t.shape[1])

    return op_matvec, op_matvec_t, op_slot, op_slot_t


_op_matvec, _op_matvec_t, _op_slot, _op_slot_t = _register_ops()


def _eager() -> bool:
    """Call the extension directly: a custom op's Python dispatch costs about 70 us per call
    (measured on this project's 2-core CPU; 3 calls per layer per decoded token). Compilers and
    ``torch.export`` trace the ops."""
    return not torch.compiler.is_compiling()


def expert_matvec(
    x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, expert_size: int, offset: int = 0
) -> torch.Tensor:
    """``x @ weight[rows].T`` for the rows of ``experts`` (row ``offset + e * expert_size + i``):
    ``x`` [hidden] or [tokens, hidden] -> [tokens, k * expert_size]."""
    args = (x, weight, experts, expert_size, offset)
    return _load().expert_matvec(*args) if _eager() else _op_matvec(*args)


def expert_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, experts: torch.Tensor, expert_size: int) -> torch.Tensor:
    """``h @ weight_t[rows]`` for the rows of ``experts``: ``h`` [k * expert_size] or
    [tokens, k * expert_size] -> [tokens, hidden]. Zero entries of ``h`` are skipped, so a
    token's unselected experts (zeroed by the caller) cost nothing."""
    args = (h, weight_t, experts, expert_size)
    return _load().expert_matvec_t(*args) if _eager() else _op_matvec_t(*args)


def select_experts(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count) for a [experts] bool mask (or [tokens, experts]: their union): every
    expert, the selected ones first in index order, and how many are selected."""
    on = on.reshape(-1, on.shape[-1]).any(dim=0)
    order = torch.argsort((~on).to(torch.int8), stable=True).to(torch.int32)
    return order, on.sum(dtype=torch.int32).reshape(1)


def slot_matvec(
    x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, expert_size: int, offset: int = 0
) -> torch.Tensor:
    """[tokens, num_experts * expert_size]: ``x`` times the rows of the first ``count`` experts
    of ``order``, slot by slot, zeros after them (the Triton kernels' convention)."""
    args = (x, weight, order, count, expert_size, offset)
    return _load().slot_matvec(*args) if _eager() else _op_slot(*args)


def slot_matvec_t(
    h: torch.Tensor, weight_t: torch.Tensor, order: torch.Tensor, count: torch.Tensor, expert_size: int
) -> torch.Tensor:
    """[tokens, hidden]: ``h`` [tokens, num_experts * expert_size] (selected slots first, as from
    :func:`slot_matvec`) times the selected experts' rows of ``weight_t``."""
    args = (h, weight_t, order, count, expert_size)
    return _load().slot_matvec_t(*args) if _eager() else _op_slot_t(*args)
