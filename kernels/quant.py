"""Weight-only group quantization in the layout the sparse kernels read (pure torch reference).

Symmetric per group of ``group_size`` consecutive entries of a row, one fp16 scale per group, as
llama.cpp's Q8_0/Q4_0 (8.5 and 4.5 bits per weight at the default group of 32):

* int8: ``q = round(w / s)`` in [-128, 127] (-128 only where a rounded scale allows it),
  ``s = max|w| / 127``; ``qweight`` int8 [rows, padded].
* int4: ``q = round(w / s)`` in [-8, 7], ``s = max|w| / 7``; two per byte as ``q + 8``, packed per
  group the way Q4_0 is (byte ``i`` of a group holds entry ``i`` in its low nibble and entry
  ``i + group_size / 2`` in its high one: one 16-byte load gives two runs of 16 entries);
  ``qweight`` uint8 [rows, padded / 2].

Rows are one per output neuron of a first projection (gate, up) and one per neuron of the down
projection stored transposed (neuron-major, groups along the hidden size), so the rows of the
selected experts are contiguous. A row whose length is not a multiple of the group size is
zero-padded to one (``padded``); ``scales`` is fp16 [rows, padded / group_size].

The kernels (``cpu.py``) take ``qweight`` as their weight and ``scales`` beside it: the weight's
dtype says which (int8 or packed int4). Imports only torch: copied next to an exported model.
"""

import torch

GROUP_SIZE = 32
BITS = {8: torch.int8, 4: torch.uint8}
QMAX = {8: 127, 4: 7}


def check_group_size(group_size: int, expert_size: int | None = None) -> None:
    """Refuse a group size the kernels cannot read, or one whose groups would straddle two experts."""
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group size {group_size}: must be a positive multiple of 32 (the kernels' vector width)")
    if expert_size is not None and expert_size % group_size:
        raise ValueError(
            f"expert size {expert_size} is not a multiple of the quantization group size {group_size}: a group "
            f"would straddle two experts; use a group size that divides the expert size (e.g. 32)"
        )


def quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) for a [rows, hidden] float weight; see the module docstring for the layout."""
    if bits not in BITS:
        raise ValueError(f"bits={bits}: expected 8 or 4")
    check_group_size(group_size)
    hidden = weight.shape[1]
    padded = -(-hidden // group_size) * group_size
    w = torch.nn.functional.pad(weight.float(), (0, padded - hidden))
    scales = group_scales(w, bits, group_size)
    return pack(integers(w, scales, bits), bits, group_size), scales.to(torch.float16)


def group_scales(
    weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """fp32 [rows, cols / group_size]: ``max|w| / qmax`` per group, rounded to a value fp16 (what the kernels
    read) and ``dtype`` (what a checkpoint of that dtype stores) both hold exactly."""
    rows, cols = weight.shape
    amax = weight.detach().float().reshape(rows, cols // group_size, group_size).abs().amax(dim=-1)
    return exact_scales(amax / QMAX[bits], dtype)


def exact_scales(scales: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """fp32 ``scales`` rounded to values fp16 (what the kernels read) and ``dtype`` (a checkpoint's) both hold."""
    return scales.to(torch.float16).to(dtype).float()


def integers(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [rows, cols]: ``round(w / s)`` against ``scales`` (0 where a scale is 0; a scale may be negative, as
    llama.cpp's Q4_0 signs its own), clamped to the ``bits`` range. Of a weight dequantized with these scales, the
    integers it came from (in fp32 and bf16 the product's rounding error is far below half a step)."""
    rows, cols = weight.shape
    safe = torch.where(scales != 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    q = (weight.detach().float().reshape(rows, scales.shape[1], -1) / safe).round()
    return q.clamp(-QMAX[bits] - 1, QMAX[bits]).to(torch.int8).reshape(rows, cols)


def pack(q: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The kernels' ``qweight`` for integer values ``q`` (int8 [rows, padded], in the ``bits`` range): int8 as
    they are; int4 two per byte, Q4_0's order within each group (see the module docstring)."""
    if bits == 8:
        return q.to(torch.int8).contiguous()
    rows = q.shape[0]
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, -1, group_size)
    half = group_size // 2
    return (u[..., :half] | (u[..., half:] << 4)).reshape(rows, -1).contiguous()


def transposed(q: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, in] weight quantized along ``in`` (integers ``q`` [out, in], ``scales`` [out, in / block]) as
    the transposed products read it, without rounding again: rows [in, padded] (``out`` padded to whole groups
    of 32) and fp16 scales [in / block, padded], one per (block of rows, column). The down projection as
    compressed-tensors stores it, read one row per neuron."""
    out, width = q.shape
    padded = -(-out // GROUP_SIZE) * GROUP_SIZE
    rows = torch.nn.functional.pad(q.t().to(torch.int8), (0, padded - out))
    per_column = torch.nn.functional.pad(scales.t().to(torch.float16), (0, padded - out))
    if width % per_column.shape[0] or (width // per_column.shape[0]) % 4:
        raise ValueError(f"{scales.shape[1]} scale groups of a multiple of 4 do not make the {width} inputs")
    return pack(rows, bits, GROUP_SIZE), per_column.contiguous()


def unpack(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The integer values, int8 [rows, padded] (int4 unpacked to [-8, 7])."""
    if qweight.dtype == torch.int8:
        return qweight
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight of dtype {qweight.dtype}: expected int8 (int8) or uint8 (packed int4)")
    rows, groups = scales.shape
    p = qweight.reshape(rows, groups, -1)
    return (torch.cat([p & 15, p >> 4], dim=-1).to(torch.int8) - 8).reshape(rows, -1)


def group_size_of(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    width = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
    return width // scales.shape[1]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
    """fp32 [rows, hidden] (``hidden``: the row length before padding; default, the padded one)."""
    q = unpack(qweight, scales).float()
    rows = q.shape[0]
    w = (q.reshape(rows, scales.shape[1], -1) * scales.float().unsqueeze(-1)).reshape(rows, -1)
    return w[:, : w.shape[1] if hidden is None else hidden]


ACTIVATION_BLOCK = 32


def quantized_activations(x: torch.Tensor, entries: int | None = None) -> torch.Tensor:
    """fp32 ``x`` as the CPU kernel multiplies it with quantized rows: each whole block of 32 consecutive entries
    of the last dimension among the first ``entries`` (default: all) rounded to int8 with its own scale, Q8_0-style
    (``d = max|x| / 127`` in fp32, ``round(x / d)`` with ties to even; llama.cpp stores ``d`` in fp16 and rounds
    ties away from zero), the rest as they are; a NaN makes its block NaN. The kernel's rounding, in torch: the
    reference its tests compare against, and what an evaluation applies to measure its cost."""
    x = x.float()
    n = x.shape[-1] if entries is None else entries
    whole = n // ACTIVATION_BLOCK * ACTIVATION_BLOCK
    blocks = x[..., :whole].reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(d > 0, (blocks / torch.where(d > 0, d, 1)).round().clamp(-127, 127), 0)
    return torch.cat([(q * d).reshape(*x.shape[:-1], whole), x[..., whole:]], dim=-1)


def bits_per_weight(bits: int, group_size: int = GROUP_SIZE) -> float:
    """Storage per weight with its share of the fp16 scale (8.5 and 4.5 at group 32)."""
    return bits + 16 / group_size
