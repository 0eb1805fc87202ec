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

Quantized weights (``quant.py``): int8 rows, or int4 rows packed two per byte (uint8), with fp16 scales
per group of 32 (or a multiple of 32) entries, passed as ``scales`` beside the weight; the same four
products, the same loops: only the row type differs (a template), so every dtype has one kernel. The
activations are rounded to int8 per block of 32 entries first, Q8_0-style, as llama.cpp's CPU kernels do
(``d = max|x| / 127``; ``quant.quantized_activations`` is the same rounding in torch): a group's products are
integer multiply-adds (AVX2's maddubs/madd, four products per 32-bit lane, when the compiler targets them,
``-march=native`` on such a CPU, AVX-512 CPUs included; plain integer loops otherwise and in the portable
build), then one fp32 multiply by the weight's and the activations' scales, fp32 accumulation. In the
transposed product, ``h`` is rounded per 32 rows of one expert (an expert of a multiple of 32 rows and
per-(32 rows, column) scales: the export's down projection; other layouts read ``h`` as fp32). The Triton
kernels multiply the activations as they are, as GPU weight-only kernels do. An expert size that is not a
multiple of the group size is refused.

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

import contextlib
import hashlib
import logging
import os
import platform
import threading
import time

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LTE_AVX2 1
#endif

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

// Dynamic int8 activations, Q8_0-style (llama.cpp's CPU kernels round theirs so): per block of 32 entries
// d = max|v| / 127 (fp32) and q = round(v / d) (ties to even) in [-127, 127], 0 where d is 0. A NaN entry makes
// its block's d NaN, so the products it enters are NaN, as fp32 activations would make them; sums[b] = sum(q).
// A quantized row then multiplies integers (32 products in a few instructions) and pays one float multiply per
// block, where widening every weight to fp32 cost more.
// quant.py's quantized_activations is the same rounding in torch (the tests' reference).
static constexpr int64_t kBlock = 32;
static void quantize_blocks(const float* v, int64_t blocks, int8_t* q, float* d, int32_t* sums) {
  for (int64_t b = 0; b < blocks; ++b) {
    const float* vb = v + b * kBlock;
    float amax = 0.f;
    bool nan = false;
    for (int64_t i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(vb[i]));
      nan |= vb[i] != vb[i];
    }
    const float db = nan ? std::nanf("") : amax / 127.f;
    d[b] = db;
    for (int64_t i = 0; i < kBlock; ++i) {
      const float r = db == 0.f ? 0.f : std::nearbyint(vb[i] / db);
      q[b * kBlock + i] = r == r ? static_cast<int8_t>(std::min(127.f, std::max(-127.f, r))) : 0;
    }
    int32_t sum = 0;  // int4's stored nibbles are q + 8: their products are 8 * sum(q) too many
    for (int64_t i = 0; i < kBlock; ++i) sum += q[b * kBlock + i];
    sums[b] = sum;
  }
}

#ifdef LTE_AVX2
static inline float hsum(__m256 v8) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
// 8 int32 lanes, lane i the sum of the products of bytes 4i .. 4i + 3 of w and x (int8, x in [-127, 127]):
// |w| times x with w's sign (maddubs multiplies unsigned by signed bytes), pairs summed, then pairs of pairs.
static inline __m256i products(__m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
static inline __m256i unsigned_products(__m256i u, __m256i x) {  // the same, u unsigned (int4's nibbles)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}
#endif

// A weight's rows as the two loops read them: dot(row, x) and a[c - c0] += h * row[c] for c in [c0, c1).
// One loop per product for every dtype; the row type is the only thing that differs. Quantized rows take the
// activations as int8 blocks too (int_blocks(): x's blocks in dot; kIntH: h in the transposed product, 32 rows
// at a time).
template <typename W>
struct DenseRows {
  static constexpr bool kIntH = false;
  const W* w;
  int64_t hidden;
  int64_t align() const { return 16; }
  int64_t int_blocks() const { return 0; }
  float dot(int64_t r, const float* x, const int8_t*, const float*, const int32_t*) const {
    const W* row = w + r * hidden;
    float lanes[16] = {0.f};  // independent partial sums: the compiler vectorises the loop
    int64_t c = 0;
    for (; c + 16 <= hidden; c += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += load(row, c + l) * x[c + l];
    float acc = 0.f;
    for (; c < hidden; ++c) acc += load(row, c) * x[c];
    for (int l = 0; l < 16; ++l) acc += lanes[l];
    return acc;
  }
  void axpy(int64_t r, float h, float* a, int64_t c0, int64_t c1) const {
    const W* row = w + r * hidden + c0;
    for (int64_t c = 0; c < c1 - c0; ++c) a[c] += h * load(row, c);
  }
  void axpy4(int64_t r, const float* h, float* a, int64_t c0, int64_t c1) const {  // rows r .. r + 3
    for (int i = 0; i < 4; ++i)
      if (h[i] != 0.f) axpy(r + i, h[i], a, c0, c1);
  }
};

// Group-quantized rows (kernels/quant.py's layout): Bits 8 = int8 entries; Bits 4 = two per byte, byte i of
// a group holding entry i (low nibble) and entry i + group / 2 (high), stored as q + 8. One fp16 scale per
// group; rows zero-padded to whole groups, of which the first `hidden` entries are real.
template <int Bits>
struct QuantRows {
  static constexpr bool kIntH = false;
  const uint8_t* q;
  const at::Half* scales;
  int64_t row_bytes, group, groups, hidden;
  int64_t align() const { return group; }  // column blocks start on a group
  int64_t int_blocks() const { return hidden / group * group / kBlock; }  // x's blocks in whole groups
  const uint8_t* at(int64_t r, int64_t g) const { return q + r * row_bytes + g * group * Bits / 8; }
  static float half(const at::Half* p) {  // one fp16 scale as fp32
#ifdef __F16C__
    return _cvtsh_ss(p->x);
#else
    return static_cast<float>(*p);
#endif
  }
  float scale(int64_t r, int64_t g) const { return half(scales + r * groups + g); }
  int value(const uint8_t* p, int64_t i) const {  // entry i of the group at p
    if (Bits == 8) return static_cast<int8_t>(p[i]);
    const int64_t half = group / 2;
    return i < half ? (p[i] & 15) - 8 : (p[i - half] >> 4) - 8;
  }
  float entry(const uint8_t* p, int64_t i) const { return static_cast<float>(value(p, i)); }
#ifdef LTE_AVX2
  static inline void widen(__m128i b, __m256& lo, __m256& hi) {  // 16 int8 -> two vectors of 8 floats
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  }
  // entries e .. e + 15 (e a multiple of 16) of the group at p, as int8
  inline __m128i entries16(const uint8_t* p, int64_t e) const {
    if (Bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + e));
    const int64_t half = group / 2;
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (e < half ? e : e - half)));
    const __m128i v = e < half ? b : _mm_srli_epi16(b, 4);
    return _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(15)), _mm_set1_epi8(8));
  }
  static constexpr int kOffset = Bits == 4 ? 8 : 0;  // what operands32 adds to each entry
  inline __m128i nibbles16(const uint8_t* p, int64_t e) const {  // int4 entries e .. e + 15 as stored: q + 8
    const int64_t half = group / 2;
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (e < half ? e : e - half)));
    return _mm_and_si128(e < half ? b : _mm_srli_epi16(b, 4), _mm_set1_epi8(15));
  }
  // Entries e .. e + 31 (e a multiple of 32) as the integer products take them: int8 as stored, int4 as stored
  // (q + 8, unsigned: maddubs multiplies them as they are, and the + 8 is taken off once per block).
  inline __m256i operands32(const uint8_t* p, int64_t e) const {
    if (Bits == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + e));
    return _mm256_set_m128i(nibbles16(p, e + 16), nibbles16(p, e));
  }
  static inline __m256i times(__m256i w, __m256i x) {  // per 32-bit lane, the sum of 4 products
    return Bits == 8 ? products(w, x) : unsigned_products(w, x);
  }
#endif
  // row r . x: whole groups as integers against x's int8 blocks xq (scales dx), the partial last group of a padded
  // row against x itself.
  float dot(int64_t r, const float* x, const int8_t* xq, const float* dx, const int32_t* xsum) const {
    const int64_t full = hidden / group, per = group / kBlock;
    float acc = 0.f;
#ifdef LTE_AVX2
    __m256 vacc = _mm256_setzero_ps();
    float offset = 0.f;  // int4: sum of s * dx * sum(x) over the blocks, kOffset times too much in vacc
    for (int64_t g = 0; g < full; ++g) {
      const uint8_t* p = at(r, g);
      const float s = scale(r, g);
      for (int64_t b = 0; b < per; ++b) {
        const int64_t xb = g * per + b;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + xb * kBlock));
        const __m256 sums = _mm256_cvtepi32_ps(times(operands32(p, b * kBlock), xv));
        const float f = s * dx[xb];
        vacc = _mm256_fmadd_ps(sums, _mm256_set1_ps(f), vacc);
        if (kOffset) offset += f * static_cast<float>(xsum[xb]);
      }
    }
    acc = hsum(vacc) - kOffset * offset;
#else
    for (int64_t g = 0; g < full; ++g) {
      const uint8_t* p = at(r, g);
      const float s = scale(r, g);
      for (int64_t b = 0; b < per; ++b) {
        const int64_t xb = g * per + b;
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i) sum += value(p, b * kBlock + i) * xq[xb * kBlock + i];
        acc += s * dx[xb] * static_cast<float>(sum);
      }
    }
#endif
    for (int64_t g = full; g < groups; ++g) {  // the last group of a padded row
      const uint8_t* p = at(r, g);
      const int64_t n = std::min(group, hidden - g * group);
      float lanes[8] = {0.f};
      int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += entry(p, i + l) * x[g * group + i + l];
      float sum = 0.f;
      for (; i < n; ++i) sum += entry(p, i) * x[g * group + i];
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      acc += scale(r, g) * sum;
    }
    return acc;
  }
  // a[c - c0] += sum over rows r .. r + 3 of h[i] * row[c]: four rows per pass over a (a is read and written
  // once for four rows, four independent streams). Rows in order, so the sums do not depend on the threads.
  void axpy4(int64_t r, const float* h, float* a, int64_t c0, int64_t c1) const {
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const uint8_t* p[4];
      float f[4];
      for (int i = 0; i < 4; ++i) p[i] = at(r + i, g), f[i] = h[i] * scale(r + i, g);
      float* ag = a + (g * group - c0);
      const int64_t n = std::min(group, c1 - g * group);
#ifdef LTE_AVX2
      if (n == group) {
        const __m256 f0 = _mm256_set1_ps(f[0]), f1 = _mm256_set1_ps(f[1]), f2 = _mm256_set1_ps(f[2]),
                     f3 = _mm256_set1_ps(f[3]);
        for (int64_t e = 0; e < group; e += 16) {
          __m256 a0 = _mm256_loadu_ps(ag + e), a1 = _mm256_loadu_ps(ag + e + 8), w0, w1;
          widen(entries16(p[0], e), w0, w1);
          a0 = _mm256_fmadd_ps(f0, w0, a0), a1 = _mm256_fmadd_ps(f0, w1, a1);
          widen(entries16(p[1], e), w0, w1);
          a0 = _mm256_fmadd_ps(f1, w0, a0), a1 = _mm256_fmadd_ps(f1, w1, a1);
          widen(entries16(p[2], e), w0, w1);
          a0 = _mm256_fmadd_ps(f2, w0, a0), a1 = _mm256_fmadd_ps(f2, w1, a1);
          widen(entries16(p[3], e), w0, w1);
          a0 = _mm256_fmadd_ps(f3, w0, a0), a1 = _mm256_fmadd_ps(f3, w1, a1);
          _mm256_storeu_ps(ag + e, a0);
          _mm256_storeu_ps(ag + e + 8, a1);
        }
        continue;
      }
#endif
      for (int64_t i = 0; i < n; ++i)
        ag[i] += f[0] * entry(p[0], i) + f[1] * entry(p[1], i) + f[2] * entry(p[2], i) + f[3] * entry(p[3], i);
    }
  }
  void axpy(int64_t r, float h, float* a, int64_t c0, int64_t c1) const {
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const uint8_t* p = at(r, g);
      const float f = h * scale(r, g);
      float* ag = a + (g * group - c0);
      for (int64_t i = 0; i < std::min(group, c1 - g * group); ++i) ag[i] += f * entry(p, i);
    }
  }
};

// The same entries, but one fp16 scale per (block of `rgroup` rows, column): scales [rows / rgroup, padded]. This
// is a [out, in] weight grouped along `in` (compressed-tensors' layout of a down projection, groups of neurons)
// read transposed, one row per neuron: the stored rounding, not a second one. Only the transposed product
// (axpy) reads it; rows r .. r + 3 of axpy4 are in one block (r is a multiple of 4, and so is rgroup).
template <int Bits>
struct ColumnScaledRows : QuantRows<Bits> {
  static constexpr bool kIntH = true;
  int64_t rgroup, padded;
  int64_t int_blocks() const { return 0; }  // no row product (dot refuses)
  const at::Half* cscales(int64_t r, int64_t c) const { return this->scales + (r / rgroup) * padded + c; }
  // a[c - c0] += s[block, c] * dh * sum_i hq[i] * row_{r + i}[c] over rows r .. r + 31 (one block of scales), with
  // integer sums in `sums` (c1 - c0 int32): four rows at a time across the columns (four streams, as the float
  // product reads them), their bytes interleaved per column (unpack) so maddubs + madd sum four products per lane;
  // a whole group's sums are kept in that lane order (columns 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31)
  // and put back in order once, when scaled. Four rows whose h are all 0 are skipped.
  void block32(int64_t r, const int8_t* hq, float dh, int32_t hsum_q, float* a, int64_t c0, int64_t c1,
               int32_t* sums) const {  // hsum_q: sum of hq (int4's offset)
    const int64_t group = this->group, g0 = c0 / group, g1 = (c1 + group - 1) / group;  // group is 32
    std::fill(sums, sums + (c1 - c0), 0);
    for (int64_t i = 0; i < kBlock; i += 4) {
      int32_t quad;
      std::memcpy(&quad, hq + i, sizeof(quad));
      if (quad == 0) continue;
      for (int64_t g = g0; g < g1; ++g) {
        int32_t* sg = sums + (g - g0) * group;
        const int64_t n = std::min(group, c1 - g * group);
#if defined(LTE_AVX2) && defined(__F16C__)
        if (n == group) {
          const __m256i w0 = this->operands32(this->at(r + i, g), 0);
          const __m256i w1 = this->operands32(this->at(r + i + 1, g), 0);
          const __m256i w2 = this->operands32(this->at(r + i + 2, g), 0);
          const __m256i w3 = this->operands32(this->at(r + i + 3, g), 0);
          const __m256i lo01 = _mm256_unpacklo_epi8(w0, w1), hi01 = _mm256_unpackhi_epi8(w0, w1),
                        lo23 = _mm256_unpacklo_epi8(w2, w3), hi23 = _mm256_unpackhi_epi8(w2, w3);
          const __m256i hv = _mm256_set1_epi32(quad);
          const __m256i parts[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                                    _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
          for (int k = 0; k < 4; ++k) {
            __m256i* v = reinterpret_cast<__m256i*>(sg + 8 * k);
            _mm256_storeu_si256(v, _mm256_add_epi32(_mm256_loadu_si256(v), this->times(parts[k], hv)));
          }
          continue;
        }
#endif
        for (int64_t c = 0; c < n; ++c)
          for (int64_t k = 0; k < 4; ++k) sg[c] += this->value(this->at(r + i + k, g), c) * hq[i + k];
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const at::Half* s = cscales(r, g * group);
      const int32_t* sg = sums + (g - g0) * group;
      float* ag = a + (g * group - c0);
      const int64_t n = std::min(group, c1 - g * group);
#if defined(LTE_AVX2) && defined(__F16C__)
      if (n == group) {
        const __m256i* v = reinterpret_cast<const __m256i*>(sg);
        const __m256i p0 = _mm256_loadu_si256(v), p1 = _mm256_loadu_si256(v + 1), p2 = _mm256_loadu_si256(v + 2),
                      p3 = _mm256_loadu_si256(v + 3);
        const __m256i cols[4] = {_mm256_permute2x128_si256(p0, p1, 0x20), _mm256_permute2x128_si256(p2, p3, 0x20),
                                 _mm256_permute2x128_si256(p0, p1, 0x31), _mm256_permute2x128_si256(p2, p3, 0x31)};
        const __m256 vd = _mm256_set1_ps(dh);
        const __m256i offset = _mm256_set1_epi32(this->kOffset * hsum_q);  // int4: the stored + 8, every column
        for (int k = 0; k < 4; ++k) {
          const __m256 sk =
              _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8 * k))), vd);
          const __m256 sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(cols[k], offset));
          _mm256_storeu_ps(ag + 8 * k, _mm256_fmadd_ps(sk, sums, _mm256_loadu_ps(ag + 8 * k)));
        }
        continue;
      }
#endif
      for (int64_t c = 0; c < n; ++c) ag[c] += this->half(s + c) * dh * static_cast<float>(sg[c]);
    }
  }
  float dot(int64_t, const float*, const int8_t*, const float*, const int32_t*) const {
    TORCH_CHECK(false, "row-block scales are for the transposed product (expert_matvec_t / slot_matvec_t)");
    return 0.f;
  }
  void axpy4(int64_t r, const float* h, float* a, int64_t c0, int64_t c1) const {
    const int64_t group = this->group;
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const uint8_t* p[4];
      for (int i = 0; i < 4; ++i) p[i] = this->at(r + i, g);
      const at::Half* s = cscales(r, g * group);
      float* ag = a + (g * group - c0);
      const int64_t n = std::min(group, c1 - g * group);
#if defined(LTE_AVX2) && defined(__F16C__)
      if (n == group) {
        const __m256 f0 = _mm256_set1_ps(h[0]), f1 = _mm256_set1_ps(h[1]), f2 = _mm256_set1_ps(h[2]),
                     f3 = _mm256_set1_ps(h[3]);
        for (int64_t e = 0; e < group; e += 16) {
          __m256 t0, t1, w0, w1;
          this->widen(this->entries16(p[0], e), w0, w1);
          t0 = _mm256_mul_ps(f0, w0), t1 = _mm256_mul_ps(f0, w1);
          this->widen(this->entries16(p[1], e), w0, w1);
          t0 = _mm256_fmadd_ps(f1, w0, t0), t1 = _mm256_fmadd_ps(f1, w1, t1);
          this->widen(this->entries16(p[2], e), w0, w1);
          t0 = _mm256_fmadd_ps(f2, w0, t0), t1 = _mm256_fmadd_ps(f2, w1, t1);
          this->widen(this->entries16(p[3], e), w0, w1);
          t0 = _mm256_fmadd_ps(f3, w0, t0), t1 = _mm256_fmadd_ps(f3, w1, t1);
          const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + e)));
          const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + e + 8)));
          _mm256_storeu_ps(ag + e, _mm256_fmadd_ps(s0, t0, _mm256_loadu_ps(ag + e)));
          _mm256_storeu_ps(ag + e + 8, _mm256_fmadd_ps(s1, t1, _mm256_loadu_ps(ag + e + 8)));
        }
        continue;
      }
#endif
      for (int64_t i = 0; i < n; ++i)
        ag[i] += this->half(s + i) * (h[0] * this->entry(p[0], i) + h[1] * this->entry(p[1], i) +
                                h[2] * this->entry(p[2], i) + h[3] * this->entry(p[3], i));
    }
  }
  void axpy(int64_t r, float h, float* a, int64_t c0, int64_t c1) const {
    const int64_t group = this->group;
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const uint8_t* p = this->at(r, g);
      const at::Half* s = cscales(r, g * group);
      float* ag = a + (g * group - c0);
      for (int64_t i = 0; i < std::min(group, c1 - g * group); ++i) ag[i] += this->half(s + i) * h * this->entry(p, i);
    }
  }
};

template <typename Rows>
static void matvec_rows(const float* x, int64_t tokens, const Rows& w, const int64_t* experts, int64_t k,
                        int64_t size, int64_t offset, int64_t hidden, float* y, int64_t ystride) {
  // y[t, j] = row_j . x[t]: each selected row is read once for all tokens; rows split across threads. Quantized
  // rows: x's int8 blocks first, once per token.
  const int64_t n = k * size, blocks = w.int_blocks();
  std::vector<int8_t> xq(tokens * blocks * kBlock);
  std::vector<float> dx(tokens * blocks);
  std::vector<int32_t> xsum(tokens * blocks);
  for (int64_t t = 0; t < tokens; ++t)
    quantize_blocks(x + t * hidden, blocks, xq.data() + t * blocks * kBlock, dx.data() + t * blocks,
                    xsum.data() + t * blocks);
  at::parallel_for(0, n, grain(hidden * tokens, 8), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = offset + experts[j / size] * size + j % size;
      for (int64_t t = 0; t < tokens; ++t)
        y[t * ystride + j] =
            w.dot(r, x + t * hidden, xq.data() + t * blocks * kBlock, dx.data() + t * blocks, xsum.data() + t * blocks);
    }
  });
}

template <typename Rows>
static void matvec_t_rows(const float* h, int64_t hstride, int64_t tokens, const Rows& w, const int64_t* experts,
                          int64_t k, int64_t size, int64_t hidden, float* out) {
  // out[t, c] = sum_j h[t, j] * row_j[c]. Each thread owns one contiguous column block and streams
  // every selected row's slice of it once for all tokens: no shared writes, a fixed sum order.
  const int64_t n = k * size;
  const int64_t threads =
      std::min(std::max<int64_t>(1, at::get_num_threads()), std::max<int64_t>(1, n * hidden * tokens / kMinWork));
  const int64_t align = w.align();
  const int64_t block = ((hidden + threads - 1) / threads + align - 1) / align * align;
  if constexpr (Rows::kIntH) {
    if (size % kBlock == 0 && w.rgroup % kBlock == 0) {  // 32 rows of one scale block at a time, h as int8 blocks
      const int64_t blocks = n / kBlock;
      std::vector<int8_t> hq(tokens * n);
      std::vector<float> dh(tokens * blocks);
      std::vector<int32_t> hsums(tokens * blocks);
      for (int64_t t = 0; t < tokens; ++t)
        quantize_blocks(h + t * hstride, blocks, hq.data() + t * n, dh.data() + t * blocks, hsums.data() + t * blocks);
      at::parallel_for(0, (hidden + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t c0 = b * block, c1 = std::min(hidden, c0 + block), width = c1 - c0;
          std::vector<float> acc(tokens * width, 0.f);
          std::vector<int32_t> sums(width);
          for (int64_t j = 0; j < n; j += kBlock) {
            const int64_t r = experts[j / size] * size + j % size;
            for (int64_t t = 0; t < tokens; ++t) {
              const float d = dh[t * blocks + j / kBlock];
              if (d == 0.f) continue;  // not this token's expert
              w.block32(r, hq.data() + t * n + j, d, hsums[t * blocks + j / kBlock], acc.data() + t * width, c0, c1,
                        sums.data());
            }
          }
          for (int64_t t = 0; t < tokens; ++t)
            std::copy(acc.begin() + t * width, acc.begin() + (t + 1) * width, out + t * hidden + c0);
        }
      });
      return;
    }
  }
  at::parallel_for(0, (hidden + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block, c1 = std::min(hidden, c0 + block), width = c1 - c0;
      std::vector<float> acc(tokens * width, 0.f);
      int64_t j = 0;
      if (size % 4 == 0)  // four rows of one expert at a time
        for (; j < n; j += 4) {
          const int64_t r = experts[j / size] * size + j % size;
          for (int64_t t = 0; t < tokens; ++t) {
            const float* s = h + t * hstride + j;
            if (s[0] == 0.f && s[1] == 0.f && s[2] == 0.f && s[3] == 0.f) continue;  // not this token's expert
            w.axpy4(r, s, acc.data() + t * width, c0, c1);
          }
        }
      for (; j < n; ++j) {
        const int64_t r = experts[j / size] * size + j % size;
        for (int64_t t = 0; t < tokens; ++t) {
          const float s = h[t * hstride + j];
          if (s == 0.f) continue;  // a token that did not select this expert
          w.axpy(r, s, acc.data() + t * width, c0, c1);
        }
      }
      for (int64_t t = 0; t < tokens; ++t)
        std::copy(acc.begin() + t * width, acc.begin() + (t + 1) * width, out + t * hidden + c0);
    }
  });
}

// Calls fn with the rows of `weight`: float32 or bfloat16 [rows, hidden]; or int8 / uint8 (packed int4)
// quantized rows with their fp16 `scales` [rows, groups] (kernels/quant.py), `hidden` <= their padded length.
template <typename Fn>
static void with_rows(const torch::Tensor& weight, const c10::optional<torch::Tensor>& scales, int64_t hidden,
                      int64_t size, const char* name, Fn fn) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.dim() == 2, name,
              " must be a contiguous 2-D CPU tensor");
  const auto type = weight.scalar_type();
  if (type == torch::kFloat || type == torch::kBFloat16) {
    TORCH_CHECK(!scales.has_value(), name, " is ", type, ": scales are for int8 / uint8 (int4) weights");
    TORCH_CHECK(hidden == weight.size(1), name, " has rows of ", weight.size(1), " entries, the input ", hidden);
    if (type == torch::kFloat)
      fn(DenseRows<float>{weight.data_ptr<float>(), hidden});
    else
      fn(DenseRows<uint16_t>{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), hidden});
    return;
  }
  TORCH_CHECK(type == torch::kChar || type == torch::kByte, name,
              " must be float32, bfloat16, int8 or uint8 (packed int4), not ", type);
  TORCH_CHECK(scales.has_value(), name, " is quantized (", type, "): pass its fp16 scales");
  const auto& s = *scales;
  const int bits = type == torch::kChar ? 8 : 4;
  const int64_t padded = weight.size(1) * 8 / bits;
  TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == torch::kHalf && s.dim() == 2 &&
                  s.size(0) > 0 && s.size(1) > 0,
              "scales must be a contiguous 2-D fp16 CPU tensor");
  if (s.size(0) != weight.size(0)) {  // one scale per (block of rows, column): ColumnScaledRows
    const int64_t rgroup = weight.size(0) / s.size(0);
    TORCH_CHECK(s.size(1) == padded && rgroup * s.size(0) == weight.size(0) && rgroup % 4 == 0, name,
                ": scales are [", weight.size(0), ", groups] (per row) or [rows / block, ", padded,
                "] (per block of rows and column, the block a multiple of 4 rows), not [", s.size(0), ", ", s.size(1),
                "]");
    TORCH_CHECK(padded % 32 == 0 && padded - 32 < hidden && hidden <= padded, name, " has rows of ", padded,
                " entries (padded to whole groups of 32), which do not fit ", hidden);
    const auto* q = reinterpret_cast<const uint8_t*>(weight.data_ptr());
    const auto* sp = s.data_ptr<at::Half>();
    if (bits == 8)
      fn(ColumnScaledRows<8>{{q, sp, weight.size(1), 32, padded / 32, hidden}, rgroup, padded});
    else
      fn(ColumnScaledRows<4>{{q, sp, weight.size(1), 32, padded / 32, hidden}, rgroup, padded});
    return;
  }
  const int64_t groups = s.size(1), group = padded / groups;
  TORCH_CHECK(group * groups == padded && group % 32 == 0, name, ": ", padded, " entries per row in ", groups,
              " groups; the group size must be a multiple of 32");
  TORCH_CHECK(size % group == 0, "expert size ", size, " is not a multiple of the quantization group size ", group,
              ": a group would straddle two experts; quantize with a group size that divides the expert size");
  TORCH_CHECK(padded - group < hidden && hidden <= padded, name, " has rows of ", padded,
              " entries (padded to whole groups of ", group, "), which do not fit ", hidden);
  const auto* q = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  const auto* sp = s.data_ptr<at::Half>();
  if (bits == 8)
    fn(QuantRows<8>{q, sp, weight.size(1), group, groups, hidden});
  else
    fn(QuantRows<4>{q, sp, weight.size(1), group, groups, hidden});
}

static at::ScalarType output_type(const torch::Tensor& weight, const torch::Tensor& input) {
  // dense weights: their dtype (as before); quantized ones: the input's
  const auto type = weight.scalar_type();
  return type == torch::kFloat || type == torch::kBFloat16 ? type : input.scalar_type();
}

static torch::Tensor rows_times(const torch::Tensor& x, const torch::Tensor& weight,
                                const c10::optional<torch::Tensor>& scales, const torch::Tensor& ids, int64_t k,
                                int64_t size, int64_t offset, int64_t width) {
  // [tokens, width]: the first k * size columns are x times the rows of the first k experts of ids, the rest 0.
  const int64_t hidden = x.size(-1);
  auto xf = x.reshape({-1, hidden}).to(torch::kFloat).contiguous();
  const int64_t tokens = xf.size(0);
  auto y = k * size == width ? torch::empty({tokens, width}, xf.options())
                             : torch::zeros({tokens, width}, xf.options());
  with_rows(weight, scales, hidden, size, "weight", [&](const auto& rows) {
    matvec_rows(xf.data_ptr<float>(), tokens, rows, ids.data_ptr<int64_t>(), k, size, offset, hidden,
                y.data_ptr<float>(), width);
  });
  return y.to(output_type(weight, x));
}

static torch::Tensor rows_t_times(const torch::Tensor& h, int64_t width, const torch::Tensor& weight_t,
                                  const c10::optional<torch::Tensor>& scales, int64_t hidden, const torch::Tensor& ids,
                                  int64_t k, int64_t size) {
  // [tokens, hidden]: h's first k * size columns (of width) times the rows of the first k experts of ids.
  if (hidden < 0) hidden = weight_t.size(1) * (weight_t.scalar_type() == torch::kByte ? 2 : 1);
  int64_t tokens = 1;  // every dimension but the last (which may be 0 when no expert is selected)
  for (int64_t d = 0; d + 1 < h.dim(); ++d) tokens *= h.size(d);
  TORCH_CHECK(h.numel() == tokens * width, "h has ", h.numel(), " entries for ", tokens, " tokens x ", width);
  auto hf = h.reshape({tokens, width}).to(torch::kFloat).contiguous();
  auto out = torch::empty({tokens, hidden}, hf.options());
  with_rows(weight_t, scales, hidden, size, "weight_t", [&](const auto& rows) {
    matvec_t_rows(hf.data_ptr<float>(), width, tokens, rows, ids.data_ptr<int64_t>(), k, size, hidden,
                  out.data_ptr<float>());
  });
  return out.to(output_type(weight_t, h));
}

// x: [tokens, hidden] (or [hidden]); returns [tokens, k * size].
torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor experts, int64_t size,
                            int64_t offset, c10::optional<torch::Tensor> scales) {
  auto ids = experts.to(torch::kLong).contiguous();
  return rows_times(x, weight, scales, ids, ids.numel(), size, offset, ids.numel() * size);
}

// h: [tokens, k * size] (or [k * size]); returns [tokens, hidden] (hidden < 0: the weight's row length).
torch::Tensor expert_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor experts, int64_t size,
                              c10::optional<torch::Tensor> scales, int64_t hidden) {
  auto ids = experts.to(torch::kLong).contiguous();
  return rows_t_times(h, ids.numel() * size, weight_t, scales, hidden, ids, ids.numel(), size);
}

static int64_t selected(const torch::Tensor& order, const torch::Tensor& count) {
  const int64_t k = count.to(torch::kLong).item<int64_t>();
  TORCH_CHECK(0 <= k && k <= order.numel(), "count ", k, " outside [0, ", order.numel(), "]");
  return k;
}

// Slots: x [tokens, hidden] -> [tokens, order.numel() * size], the count selected slots first, zeros after.
torch::Tensor slot_matvec(torch::Tensor x, torch::Tensor weight, torch::Tensor order, torch::Tensor count, int64_t size,
                          int64_t offset, c10::optional<torch::Tensor> scales) {
  auto ids = order.to(torch::kLong).contiguous();
  return rows_times(x, weight, scales, ids, selected(ids, count), size, offset, ids.numel() * size);
}

// Slots: h [tokens, order.numel() * size] (selected slots first) -> [tokens, hidden].
torch::Tensor slot_matvec_t(torch::Tensor h, torch::Tensor weight_t, torch::Tensor order, torch::Tensor count,
                            int64_t size, c10::optional<torch::Tensor> scales, int64_t hidden) {
  auto ids = order.to(torch::kLong).contiguous();
  return rows_t_times(h, ids.numel() * size, weight_t, scales, hidden, ids, selected(ids, count), size);
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

# A build takes 20-60 s; a build lock older than this was left by an interrupted one (Ctrl-C, a killed job).
STALE_LOCK_S = 600


def _wait_for_build_lock(directory: str) -> None:
    """torch's build lock makes every later load wait, silently and forever, for a lock file that an interrupted
    build never removed. Say that we wait; remove the lock once it is older than any build takes."""
    lock = os.path.join(directory, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age < STALE_LOCK_S:
        logger.warning("LTE: waiting for another process's build of the CPU kernel (%s); if none runs, delete it", lock)
        deadline = time.monotonic() + STALE_LOCK_S - age
        while os.path.exists(lock) and time.monotonic() < deadline:
            time.sleep(0.5)
    if os.path.exists(lock):
        logger.warning("LTE: removing the CPU kernel's build lock %s, left by an interrupted build", lock)
        with contextlib.suppress(OSError):
            os.remove(lock)


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
                _wait_for_build_lock(directory)
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

    def result(weight: torch.Tensor, source: torch.Tensor, *shape: int) -> torch.Tensor:
        dtype = weight.dtype if weight.is_floating_point() else source.dtype  # quantized: the input's dtype
        return source.new_empty(*shape, dtype=dtype)

    def out_width(weight_t: torch.Tensor, hidden: int) -> int:
        return hidden if hidden >= 0 else weight_t.shape[1] * (2 if weight_t.dtype == torch.uint8 else 1)

    @custom_op(f"{_NAMESPACE}::expert_matvec", mutates_args=())
    def op_matvec(
        x: torch.Tensor,
        weight: torch.Tensor,
        experts: torch.Tensor,
        size: int,
        offset: int,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _load().expert_matvec(x, weight, experts, size, offset, scales)

    @register_fake(f"{_NAMESPACE}::expert_matvec")
    def _(x, weight, experts, size, offset, scales=None):
        return result(weight, x, tokens_of(x, x.shape[-1]), experts.numel() * size)

    @custom_op(f"{_NAMESPACE}::expert_matvec_t", mutates_args=())
    def op_matvec_t(
        h: torch.Tensor,
        weight_t: torch.Tensor,
        experts: torch.Tensor,
        size: int,
        scales: torch.Tensor | None = None,
        hidden: int = -1,
    ) -> torch.Tensor:
        return _load().expert_matvec_t(h, weight_t, experts, size, scales, hidden)

    @register_fake(f"{_NAMESPACE}::expert_matvec_t")
    def _(h, weight_t, experts, size, scales=None, hidden=-1):
        return result(weight_t, h, tokens_of(h, experts.numel() * size), out_width(weight_t, hidden))

    @custom_op(f"{_NAMESPACE}::slot_matvec", mutates_args=())
    def op_slot(
        x: torch.Tensor,
        weight: torch.Tensor,
        order: torch.Tensor,
        count: torch.Tensor,
        size: int,
        offset: int,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _load().slot_matvec(x, weight, order, count, size, offset, scales)

    @register_fake(f"{_NAMESPACE}::slot_matvec")
    def _(x, weight, order, count, size, offset, scales=None):
        return result(weight, x, tokens_of(x, x.shape[-1]), order.numel() * size)

    @custom_op(f"{_NAMESPACE}::slot_matvec_t", mutates_args=())
    def op_slot_t(
        h: torch.Tensor,
        weight_t: torch.Tensor,
        order: torch.Tensor,
        count: torch.Tensor,
        size: int,
        scales: torch.Tensor | None = None,
        hidden: int = -1,
    ) -> torch.Tensor:
        return _load().slot_matvec_t(h, weight_t, order, count, size, scales, hidden)

    @register_fake(f"{_NAMESPACE}::slot_matvec_t")
    def _(h, weight_t, order, count, size, scales=None, hidden=-1):
        return result(weight_t, h, tokens_of(h, order.numel() * size), out_width(weight_t, hidden))

    return op_matvec, op_matvec_t, op_slot, op_slot_t


_op_matvec, _op_matvec_t, _op_slot, _op_slot_t = _register_ops()


def _eager() -> bool:
    """Call the extension directly: a custom op's Python dispatch costs about 70 us per call
    (measured on this project's 2-core CPU; 3 calls per layer per decoded token). Compilers and
    ``torch.export`` trace the ops."""
    return not torch.compiler.is_compiling()


# Quantized weights (kernels/quant.py): ``weight`` int8, or uint8 holding two int4 entries per byte, with
# ``scales`` (fp16 [rows, groups]) beside it; the output then has the input's dtype. The transposed products also
# take fp16 scales [rows / block, padded]: one per block of rows and column (quant.transposed). ``hidden`` (transposed
# products) is the output width when the rows were padded to whole groups.


def expert_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    experts: torch.Tensor,
    expert_size: int,
    offset: int = 0,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight[rows].T`` for the rows of ``experts`` (row ``offset + e * expert_size + i``):
    ``x`` [hidden] or [tokens, hidden] -> [tokens, k * expert_size]."""
    args = (x, weight, experts, expert_size, offset, scales)
    return _load().expert_matvec(*args) if _eager() else _op_matvec(*args)


def expert_matvec_t(
    h: torch.Tensor,
    weight_t: torch.Tensor,
    experts: torch.Tensor,
    expert_size: int,
    scales: torch.Tensor | None = None,
    hidden: int = -1,
) -> torch.Tensor:
    """``h @ weight_t[rows]`` for the rows of ``experts``: ``h`` [k * expert_size] or
    [tokens, k * expert_size] -> [tokens, hidden]. Zero entries of ``h`` are skipped, so a
    token's unselected experts (zeroed by the caller) cost nothing."""
    args = (h, weight_t, experts, expert_size, scales, hidden)
    return _load().expert_matvec_t(*args) if _eager() else _op_matvec_t(*args)


def _native_bf16() -> bool:
    """Whether the CPU multiplies bf16 itself (AVX512-BF16 or AMX), where ATen's bf16 GEMMs are fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


_NATIVE_BF16 = _native_bf16()


def dense_matmul_t(h: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``h @ weight_t`` over every row of a [neurons, out] row-major weight (the down projection in the kernels'
    layout): the masked path, for more tokens than the kernels take. In bf16 on a CPU without bf16 instructions,
    an fp32 GEMM over a converted copy: ATen's bf16 GEMMs want ``nn.Linear``'s [out, in] storage and on this
    one run a scalar loop there (AVX2: 2.2 s for 16 tokens of a 1.1B model's down projection, 0.16 s as fp32).
    The copy is one layer's, freed at once."""
    if weight_t.device.type == "cpu" and weight_t.dtype == torch.bfloat16 and not _NATIVE_BF16:
        flat = h.reshape(-1, h.shape[-1]).float()
        return torch.mm(flat, weight_t.float()).to(h.dtype).view(*h.shape[:-1], weight_t.shape[1])
    return torch.matmul(h, weight_t)


def select_experts(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count) for a [experts] bool mask (or [tokens, experts]: their union): every
    expert, the selected ones first in index order, and how many are selected."""
    on = on.reshape(-1, on.shape[-1]).any(dim=0)
    order = torch.argsort((~on).to(torch.int8), stable=True).to(torch.int32)
    return order, on.sum(dtype=torch.int32).reshape(1)


def slot_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    expert_size: int,
    offset: int = 0,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """[tokens, num_experts * expert_size]: ``x`` times the rows of the first ``count`` experts
    of ``order``, slot by slot, zeros after them (the Triton kernels' convention)."""
    args = (x, weight, order, count, expert_size, offset, scales)
    return _load().slot_matvec(*args) if _eager() else _op_slot(*args)


def slot_matvec_t(
    h: torch.Tensor,
    weight_t: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    expert_size: int,
    scales: torch.Tensor | None = None,
    hidden: int = -1,
) -> torch.Tensor:
    """[tokens, hidden]: ``h`` [tokens, num_experts * expert_size] (selected slots first, as from
    :func:`slot_matvec`) times the selected experts' rows of ``weight_t``."""
    args = (h, weight_t, order, count, expert_size, scales, hidden)
    return _load().slot_matvec_t(*args) if _eager() else _op_slot_t(*args)
