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
static void matvec_rows(const float* x, int64_t tokens, const W* weight, const int64_t* experts, int64_t k,
                        int64_t size, int64_t offset, int64_t hidden, float* y) {
  // y[t, j] = row_j . x[t]: each selected row is read once for all tokens; rows split across threads.
  const int64_t n = k * size;
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
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
        y[t * n + j] = acc;
      }
    }
  });
}

template <typename W>
static void matvec_t_rows(const float* h, int64_t tokens, const W* weight_t, const int64_t* experts, int64_t k,
                          int64_t size, int64_t hidden, float* out) {
  // out[t, c] = sum_j h[t, j] * row_j[c]. Each thread owns one contiguous column block and streams
  // every selected row's slice of it once for all tokens: no shared writes, a fixed sum order.
  const int64_t n = k * size;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = ((hidden + threads - 1) / threads + 15) / 16 * 16;
  at::parallel_for(0, (hidden + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block, c1 = std::min(hidden, c0 + block), width = c1 - c0;
      std::vector<float> acc(tokens * width, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const W* row = weight_t + (experts[j / size] * size + j % size) * hidden + c0;
        for (int64_t t = 0; t < tokens; ++t) {
          const float s = h[t * n + j];
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
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, name, " must be float32 or bfloat16");
}

// x: [tokens, hidden] (or [hidden]); returns [tokens, k * size] in weight's dtype.
torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor experts, int64_t size, int64_t offset) {
  check(weight, "weight");
  const int64_t hidden = weight.size(1);
  auto xf = x.reshape({-1, hidden}).to(torch::kFloat).contiguous();
  auto ids = experts.to(torch::kLong).contiguous();
  const int64_t k = ids.numel(), tokens = xf.size(0);
  auto y = torch::empty({tokens, k * size}, xf.options());
  if (weight.scalar_type() == torch::kFloat)
    matvec_rows(xf.data_ptr<float>(), tokens, weight.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size, offset, hidden,
                y.data_ptr<float>());
  else
    matvec_rows(xf.data_ptr<float>(), tokens, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                ids.data_ptr<int64_t>(), k, size, offset, hidden, y.data_ptr<float>());
  return y.to(weight.scalar_type());
}

// h: [tokens, k * size] (or [k * size]); returns [tokens, hidden] in weight_t's dtype.
torch::Tensor expert_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor experts, int64_t size) {
  check(weight_t, "weight_t");
  auto ids = experts.to(torch::kLong).contiguous();
  const int64_t k = ids.numel(), hidden = weight_t.size(1);
  int64_t tokens = 1;  // every dimension but the last (which may be 0 when no expert is selected)
  for (int64_t d = 0; d + 1 < h.dim(); ++d) tokens *= h.size(d);
  TORCH_CHECK(h.numel() == tokens * k * size, "h has ", h.numel(), " entries for ", tokens, " tokens x ", k, " experts of ", size);
  auto hf = h.reshape({tokens, k * size}).to(torch::kFloat).contiguous();
  auto out = torch::empty({tokens, hidden}, hf.options());
  if (weight_t.scalar_type() == torch::kFloat)
    matvec_t_rows(hf.data_ptr<float>(), tokens, weight_t.data_ptr<float>(), ids.data_ptr<int64_t>(), k, size, hidden,
                  out.data_ptr<float>());
  else
    matvec_t_rows(hf.data_ptr<float>(), tokens, reinterpret_cast<const uint16_t*>(weight_t.data_ptr<at::BFloat16>()),
                  ids.data_ptr<int64_t>(), k, size, hidden, out.data_ptr<float>());
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
                    name="lte_cpu_sparse_ffn_v5", cpp_sources=_SOURCE, functions=["expert_matvec", "expert_matvec_t"],
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
    """``x @ weight[rows].T`` for the rows of ``experts`` (row ``offset + e * expert_size + i``):
    ``x`` [hidden] or [tokens, hidden] -> [tokens, k * expert_size]."""
    return _load().expert_matvec(x, weight, experts, expert_size, offset)


def expert_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, experts: torch.Tensor, expert_size: int) -> torch.Tensor:
    """``h @ weight_t[rows]`` for the rows of ``experts``: ``h`` [k * expert_size] or
    [tokens, k * expert_size] -> [tokens, hidden]. Zero entries of ``h`` are skipped, so a
    token's unselected experts (zeroed by the caller) cost nothing."""
    return _load().expert_matvec_t(h, weight_t, experts, expert_size)
