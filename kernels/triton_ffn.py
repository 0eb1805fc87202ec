"""Triton kernels for batch-1 sparse FFN decoding on GPU, over expert-contiguous weights.

The selection stays on the device: :func:`select_experts` orders the experts so the selected
ones come first and counts them, both as device tensors, and the kernels read that count. No
host synchronisation, no ``nonzero()``, and fixed launch grids, so a decoding step can be
captured in a CUDA graph.

* :func:`expert_matvec`: ``y[t, slot*E + i] = weight[offset + expert(slot)*E + i] . x[t]`` for
  the selected slots; one program per expert slot (programs past the count exit at once). ``y``
  has room for every expert and is zero past the selected ones, so elementwise activations
  on it keep those entries at zero.
* :func:`expert_matvec_t`: ``out[t] = sum over selected slots of y[t, slot rows] @ weight_t[expert
  rows]``; one program per column block loops over the selected experts in order, so the sum
  is deterministic (no atomics).

One token uses matrix-vector kernels; 2 to 8 tokens (the small-batch variant) use ``tl.dot``
over the union of their experts, each row read once for all of them; the caller zeroes a
token's entries for experts it did not select.

fp32 accumulation; fp32, bf16 or fp16 weights, or int8 / int4 rows with fp16 group scales in
``quant.py``'s layout (``scales`` beside the weight; dequantized in the kernel as the rows are loaded).
CI runs them on the CPU under ``TRITON_INTERPRET=1``. Imports only torch and triton (optional):
this file is copied next to an exported model's ``modeling_lte.py``.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: callers use another path
    triton = None

BLOCK_H = 128


def available() -> bool:
    return triton is not None


def select_experts(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count) for a [experts] bool mask (or [tokens, experts]: their union): selected
    experts first, in index order."""
    on = on.reshape(-1, on.shape[-1]).any(dim=0)
    order = torch.argsort((~on).to(torch.int8), stable=True).to(torch.int32)
    return order, on.sum(dtype=torch.int32).reshape(1)


if triton is not None:

    @triton.jit
    def _load_rows(
        w_ptr, s_ptr, rows, cols, mask, hidden, BITS: tl.constexpr, GROUP: tl.constexpr, RGROUP: tl.constexpr
    ):
        """fp32 weight[rows, cols]: float rows as stored, or group-quantized ones dequantized (int8; int4
        two per byte, byte i of a group holding entries i and i + GROUP / 2, as q + 8). Scales per (row, group
        of GROUP columns), or with RGROUP > 0 per (block of RGROUP rows, column): quant.transposed's layout."""
        if BITS == 0:
            w = tl.load(w_ptr + rows * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            groups = tl.cdiv(hidden, GROUP)
            if RGROUP == 0:
                scale = tl.load(s_ptr + rows * groups + cols // GROUP, mask=mask, other=0.0).to(tl.float32)
            else:
                scale = tl.load(s_ptr + (rows // RGROUP) * (groups * GROUP) + cols, mask=mask, other=0.0)
                scale = scale.to(tl.float32)
            if BITS == 8:
                q = tl.load(w_ptr + rows * (groups * GROUP) + cols, mask=mask, other=0).to(tl.float32)
            else:
                half = GROUP // 2
                e = cols % GROUP
                byte = tl.load(w_ptr + rows * (groups * half) + (cols // GROUP) * half + e % half, mask=mask, other=8)
                nibble = tl.where(e < half, byte & 15, byte >> 4)
                q = (nibble.to(tl.int32) - 8).to(tl.float32)
            w = q * scale
        return w

    @triton.jit
    def _expert_matvec_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        order_ptr,
        count_ptr,
        y_ptr,
        tokens,
        hidden,
        offset,
        width,
        EXPERT_SIZE: tl.constexpr,
        ES_PAD: tl.constexpr,
        T_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        RGROUP: tl.constexpr,
    ):
        # y[t, slot*E + i] for every token t: one program per expert slot reads its rows once.
        slot = tl.program_id(0)
        count = tl.load(count_ptr)
        if slot < count:
            expert = tl.load(order_ptr + slot).to(tl.int64)
            r = tl.arange(0, ES_PAD)
            rmask = r < EXPERT_SIZE
            t = tl.arange(0, T_PAD)
            tmask = t < tokens
            rows = offset + expert * EXPERT_SIZE + r
            acc = tl.zeros((T_PAD, ES_PAD), dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < hidden
                x = tl.load(
                    x_ptr + t[:, None] * hidden + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0
                )
                w = _load_rows(
                    w_ptr,
                    s_ptr,
                    rows[:, None],
                    cols[None, :],
                    rmask[:, None] & cmask[None, :],
                    hidden,
                    BITS,
                    GROUP,
                    RGROUP,
                )
                if T_PAD == 1:  # one token: a matrix-vector product
                    acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
                else:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            out = y_ptr + t[:, None] * width + (slot * EXPERT_SIZE + r)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _expert_matvec_t_kernel(
        h_ptr,
        wt_ptr,
        s_ptr,
        order_ptr,
        count_ptr,
        out_ptr,
        tokens,
        hidden,
        width,
        EXPERT_SIZE: tl.constexpr,
        ES_PAD: tl.constexpr,
        T_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        RGROUP: tl.constexpr,
    ):
        # out[t, columns of this program] = sum over the selected slots, in order (deterministic).
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < hidden
        r = tl.arange(0, ES_PAD)
        rmask = r < EXPERT_SIZE
        t = tl.arange(0, T_PAD)
        tmask = t < tokens
        count = tl.load(count_ptr)
        acc = tl.zeros((T_PAD, BLOCK), dtype=tl.float32)
        for slot in range(count):
            expert = tl.load(order_ptr + slot).to(tl.int64)
            h = tl.load(
                h_ptr + t[:, None] * width + (slot * EXPERT_SIZE + r)[None, :],
                mask=tmask[:, None] & rmask[None, :],
                other=0.0,
            )
            w = _load_rows(
                wt_ptr,
                s_ptr,
                (expert * EXPERT_SIZE + r)[:, None],
                cols[None, :],
                rmask[:, None] & cmask[None, :],
                hidden,
                BITS,
                GROUP,
                RGROUP,
            )
            if T_PAD == 1:
                acc += tl.sum(w * tl.trans(h.to(tl.float32)), axis=0)[None, :]
            else:
                acc += tl.dot(h.to(tl.float32), w, input_precision="ieee")
        tl.store(
            out_ptr + t[:, None] * hidden + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=tmask[:, None] & cmask[None, :],
        )


MAX_TOKENS = 8  # the small-batch limit


def _launch_sizes(tokens: int, expert_size: int) -> dict:
    """Compile-time sizes: one token runs a matrix-vector product; 2 to 8 use ``tl.dot``,
    which needs every dimension >= 16."""
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"{tokens} tokens: the Triton kernels take 1 to {MAX_TOKENS}")
    if tokens == 1:
        return {"ES_PAD": triton.next_power_of_2(expert_size), "T_PAD": 1, "BLOCK": BLOCK_H}
    return {
        "ES_PAD": max(16, triton.next_power_of_2(expert_size)),
        "T_PAD": max(16, triton.next_power_of_2(tokens)),
        "BLOCK": 64,
    }


def _quantized(weight: torch.Tensor, scales: torch.Tensor | None, expert_size: int, transposed: bool) -> dict:
    """BITS, GROUP and RGROUP for the kernels: 0 for float weights; 8 or 4 with the group size of quantized
    ones; RGROUP > 0 for scales per (block of rows, column) (``quant.transposed``: transposed products only)."""
    if weight.is_floating_point():
        if scales is not None:
            raise ValueError(f"weight is {weight.dtype}: scales are for int8 / uint8 (int4) weights")
        return {"BITS": 0, "GROUP": 1, "RGROUP": 0}
    if weight.dtype not in (torch.int8, torch.uint8) or scales is None:
        raise ValueError(f"weight of dtype {weight.dtype}: expected a float dtype, or int8 / uint8 with its scales")
    bits = 8 if weight.dtype == torch.int8 else 4
    padded = weight.shape[1] * 8 // bits
    if scales.shape[0] != weight.shape[0]:  # per (block of rows, column)
        rgroup = weight.shape[0] // scales.shape[0]
        if not transposed or rgroup * scales.shape[0] != weight.shape[0] or scales.shape[1] != padded:
            raise ValueError(
                f"scales {tuple(scales.shape)} for {weight.shape[0]} rows of {padded}: per row [rows, groups], or "
                f"per (block of rows, column) [rows / block, {padded}] for the transposed product only"
            )
        return {"BITS": bits, "GROUP": 32, "RGROUP": rgroup}
    group = padded // scales.shape[1]
    if group % 32 or expert_size % group:
        raise ValueError(
            f"group size {group}, expert size {expert_size}: the group size must be a multiple of 32 dividing the "
            "expert size (a group would straddle two experts)"
        )
    return {"BITS": bits, "GROUP": group, "RGROUP": 0}


def expert_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    expert_size: int,
    offset: int = 0,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """[tokens, num_experts * expert_size] for ``x`` [tokens, hidden] (1 to 8 tokens; [hidden] is
    one): each token's products with the selected experts' rows of ``weight``, selected slots
    first (in ``order``), zeros after them. Quantized weights: ``scales`` beside them; the output
    then has ``x``'s dtype."""
    quantized = _quantized(weight, scales, expert_size, transposed=False)
    hidden = x.shape[-1]
    x = x.reshape(-1, hidden).contiguous()
    tokens, num_experts = x.shape[0], order.numel()
    width = num_experts * expert_size
    dtype = weight.dtype if weight.is_floating_point() else x.dtype
    y = torch.zeros(tokens, width, dtype=dtype, device=weight.device)
    _expert_matvec_kernel[(num_experts,)](
        x,
        weight,
        weight if scales is None else scales,
        order,
        count,
        y,
        tokens,
        hidden,
        offset,
        width,
        EXPERT_SIZE=expert_size,
        **_launch_sizes(tokens, expert_size),
        **quantized,
    )
    return y


def expert_matvec_t(
    h: torch.Tensor,
    weight_t: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    expert_size: int,
    scales: torch.Tensor | None = None,
    hidden: int = -1,
) -> torch.Tensor:
    """[tokens, hidden]: ``h`` [tokens, num_experts * expert_size] (selected slots first, as from
    :func:`expert_matvec`) times the selected experts' rows of ``weight_t``. Quantized weights:
    ``scales`` beside them, ``hidden`` the row length before padding (default: the padded one)."""
    quantized = _quantized(weight_t, scales, expert_size, transposed=True)
    if hidden < 0:
        hidden = weight_t.shape[1] * (2 if weight_t.dtype == torch.uint8 else 1)
    width = order.numel() * expert_size
    h = h.reshape(-1, width).contiguous()
    tokens = h.shape[0]
    dtype = weight_t.dtype if weight_t.is_floating_point() else h.dtype
    out = torch.empty(tokens, hidden, dtype=dtype, device=weight_t.device)
    sizes = _launch_sizes(tokens, expert_size)
    _expert_matvec_t_kernel[(triton.cdiv(hidden, sizes["BLOCK"]),)](
        h,
        weight_t,
        weight_t if scales is None else scales,
        order,
        count,
        out,
        tokens,
        hidden,
        width,
        EXPERT_SIZE=expert_size,
        **sizes,
        **quantized,
    )
    return out
