"""CPU kernels for batch-1 sparse FFN decoding over expert-contiguous weights.

Two memory-bound matrix-vector products that read only the selected experts' rows:

* ``expert_matvec(x, weight, experts, expert_size, offset=0)``: ``y = weight[rows] @ x`` for
  the rows of the selected experts (a first projection: gate, up, or the input projection),
  ``weight`` [neurons, hidden] row-major; returns [k * expert_size].
* ``expert_matvec_t(h, weight_t, experts, expert_size)``: ``out = h @ weight_t[rows]`` (the
  down projection stored transposed, one row per neuron); returns [hidden].

Both are C++ loops parallelised with ATen's thread pool (``at::parallel_for``): the first over
the selected rows, the second over one column block per thread, so no thread ever writes
another's output (no atomics, a fixed summation order). Weights are read in place; no
gather copy. fp32 and bf16 weights, fp32 accumulation.

The C++ source is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++
compiler and ninja are needed; the build is cached per machine). If it cannot be built,
:func:`available` is False and callers use their pure-torch path. Imports only torch: this
file is copied next to an exported model's ``modeling_lte.py``.
"""

import logging
import os
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

template <typename W>
static void matvec_rows(const float* x, const W* weight, const int64_t* experts, int64_t k, int64_t size,
                        int64_t offset, int64_t hidden, float* y) {
  // One dot product per selected row; rows are split across threads.
  at::parallel_for(0, k * size, 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const W* row = weight + (offset + experts[j / size] * size + j % size) * hidden;
      float lanes[16] = {0.f};  // independent partial sums: the compiler vectorises the loop
      int64_t c = 0;
      for (; c + 16 <= hidden; c += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += load(row, c + l) * x[c + l];
      float acc = 0.f;
      for (; c < hidden; ++c) acc += load(row, c) * x[c];
      for (int l = 0; l < 16; ++l) acc += lanes[l];
      y[j] = acc;
    }
  });
}

template <typename W>
static void matvec_t_rows(const float* h, const W* weight_t, const int64_t* experts, int64_t k, int64_t size,
                          int64_t hidden, float* out) {
  // out[c] = sum_j h[j] * row_j[c]. Each thread owns one contiguous column block and streams
  // every selected row's slice of it: no shared writes, and the sum order is fixed.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = ((hidden + threads - 1) / threads + 15) / 16 * 16;
  at::parallel_for(0, (hidden + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block, c1 = std::min(hidden, c0 + block);
      std::vector<float> acc(c1 - c0, 0.f);
      float* a = acc.data();
      for (int64_t j = 0; j < k * size; ++j) {
        const W* row = weight_t + (experts[j / size] * size + j % size) * hidden + c0;
        const float s = h[j];
        for (int64_t c = 0; c < c1 - c0; ++c) a[c] += s * load(row, c);
      }
      std::copy(acc.begin(), acc.end(), out + c0);
    }
  });
}

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, name, " must be float32 or bfloat16");
}

torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor experts, int64_t size, int64_t offset) {
  check(weight, "weight");
  auto xf = x.reshape(-1).to(torch::kFloat).contiguous();
  auto ids = experts.to(torch::kLong).contiguous();
  const int64_t k = ids.numel(), hidden = weight.size(1);
  TORCH_CHECK(xf.numel() == hidden, "x has ", xf.numel(), " features, weight expects ", hidden);
  auto y = torch::empty({k * size}, xf.options());
  if (weight.scalar_type() == torch::kFloat)
    matvec_rows(xf.data_ptr<float>(), weight.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size, offset, hidden, y.data_ptr<float>());
  else
    matvec_rows(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), ids.data_ptr<int64_t>(),
                k, size, offset, hidden, y.data_ptr<float>());
  return y.to(weight.scalar_type());
}

torch::Tensor expert_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor experts, int64_t size) {
  check(weight_t, "weight_t");
  auto hf = h.reshape(-1).to(torch::kFloat).contiguous();
  auto ids = experts.to(torch::kLong).contiguous();
  const int64_t k = ids.numel(), hidden = weight_t.size(1);
  TORCH_CHECK(hf.numel() == k * size, "h has ", hf.numel(), " entries for ", k, " experts of ", size);
  auto out = torch::empty({hidden}, hf.options());
  if (weight_t.scalar_type() == torch::kFloat)
    matvec_t_rows(hf.data_ptr<float>(), weight_t.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size, hidden, out.data_ptr<float>());
  else
    matvec_t_rows(hf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight_t.data_ptr<at::BFloat16>()), ids.data_ptr<int64_t>(),
                  k, size, hidden, out.data_ptr<float>());
  return out.to(weight_t.scalar_type());
}
"""

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
                from torch.utils.cpp_extension import load_inline

                _extension = load_inline(
                    name="lte_cpu_sparse_ffn_v3", cpp_sources=_SOURCE, functions=["expert_matvec", "expert_matvec_t"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no ninja, unsupported flags: use the pure-torch path
                logger.warning("LTE CPU sparse kernel unavailable (%s); using the pure-torch path", str(exc).splitlines()[0])
                _failed = True
    return _extension


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _load() is not None


def expert_matvec(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, expert_size: int,
                  offset: int = 0) -> torch.Tensor:
    """``weight[rows] @ x`` for the rows of ``experts`` (row ``offset + e * expert_size + i``)."""
    return _load().expert_matvec(x, weight, experts, expert_size, offset)


def expert_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, experts: torch.Tensor, expert_size: int) -> torch.Tensor:
    """``h @ weight_t[rows]`` for the rows of ``experts``; ``h`` holds k * expert_size entries."""
    return _load().expert_matvec_t(h, weight_t, experts, expert_size)
