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

fp32 accumulation; fp32, bf16 or fp16 weights. CI runs them on the CPU under
``TRITON_INTERPRET=1``. Imports only torch and triton (optional): this file is copied next to
an exported model's ``modeling_lte.py``.
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
    def _expert_matvec_kernel(x_ptr, w_ptr, order_ptr, count_ptr, y_ptr, hidden, offset,
                              EXPERT_SIZE: tl.constexpr, ES_PAD: tl.constexpr, BLOCK: tl.constexpr):
        slot = tl.program_id(0)
        count = tl.load(count_ptr)
        if slot < count:
            expert = tl.load(order_ptr + slot).to(tl.int64)
            r = tl.arange(0, ES_PAD)
            rmask = r < EXPERT_SIZE
            rows = offset + expert * EXPERT_SIZE + r
            acc = tl.zeros((ES_PAD, BLOCK), dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < hidden
                x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + rows[:, None] * hidden + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
                acc += w.to(tl.float32) * x[None, :]
            y = tl.sum(acc, axis=1)
            tl.store(y_ptr + slot * EXPERT_SIZE + r, y.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _expert_matvec_t_kernel(h_ptr, wt_ptr, order_ptr, count_ptr, out_ptr, hidden,
                                EXPERT_SIZE: tl.constexpr, ES_PAD: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < hidden
        r = tl.arange(0, ES_PAD)
        rmask = r < EXPERT_SIZE
        count = tl.load(count_ptr)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for slot in range(0, count):
            expert = tl.load(order_ptr + slot).to(tl.int64)
            h = tl.load(h_ptr + slot * EXPERT_SIZE + r, mask=rmask, other=0.0).to(tl.float32)
            w = tl.load(wt_ptr + (expert * EXPERT_SIZE + r)[:, None] * hidden + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * h[:, None], axis=0)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


    @triton.jit
    def _expert_matmul_kernel(x_ptr, w_ptr, order_ptr, count_ptr, y_ptr, tokens, hidden, offset, width,
                              EXPERT_SIZE: tl.constexpr, ES_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
        # A few tokens: y[t, slot*E + i] for every token t, reading each selected row once.
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
                x = tl.load(x_ptr + t[:, None] * hidden + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
                w = tl.load(w_ptr + rows[:, None] * hidden + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            out = y_ptr + t[:, None] * width + (slot * EXPERT_SIZE + r)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _expert_matmul_t_kernel(h_ptr, wt_ptr, order_ptr, count_ptr, out_ptr, tokens, hidden, width,
                                EXPERT_SIZE: tl.constexpr, ES_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < hidden
        r = tl.arange(0, ES_PAD)
        rmask = r < EXPERT_SIZE
        t = tl.arange(0, T_PAD)
        tmask = t < tokens
        count = tl.load(count_ptr)
        acc = tl.zeros((T_PAD, BLOCK), dtype=tl.float32)
        for slot in range(0, count):
            expert = tl.load(order_ptr + slot).to(tl.int64)
            h = tl.load(h_ptr + t[:, None] * width + (slot * EXPERT_SIZE + r)[None, :], mask=tmask[:, None] & rmask[None, :],
                        other=0.0)
            w = tl.load(wt_ptr + (expert * EXPERT_SIZE + r)[:, None] * hidden + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        tl.store(out_ptr + t[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])


MAX_TOKENS = 8  # the small-batch kernels' limit


def _dot_size(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def expert_matvec(x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, expert_size: int,
                  offset: int = 0) -> torch.Tensor:
    """[tokens, num_experts * expert_size] for ``x`` [tokens, hidden] (1 to 8 tokens; [hidden] is
    one): each token's products with the selected experts' rows of ``weight``, selected slots
    first (in ``order``), zeros after them."""
    hidden = weight.shape[1]
    x = x.reshape(-1, hidden).contiguous()
    tokens, num_experts = x.shape[0], order.numel()
    width = num_experts * expert_size
    y = torch.zeros(tokens, width, dtype=weight.dtype, device=weight.device)
    es_pad = triton.next_power_of_2(expert_size)
    if tokens == 1:
        _expert_matvec_kernel[(num_experts,)](x, weight, order, count, y, hidden, offset,
                                              EXPERT_SIZE=expert_size, ES_PAD=es_pad, BLOCK=BLOCK_H)
    elif tokens <= MAX_TOKENS:
        _expert_matmul_kernel[(num_experts,)](x, weight, order, count, y, tokens, hidden, offset, width,
                                              EXPERT_SIZE=expert_size, ES_PAD=_dot_size(expert_size),
                                              T_PAD=_dot_size(tokens), BLOCK=64)
    else:
        raise ValueError(f"{tokens} tokens: the Triton kernels take 1 to {MAX_TOKENS}")
    return y


def expert_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, order: torch.Tensor, count: torch.Tensor,
                    expert_size: int) -> torch.Tensor:
    """[tokens, hidden]: ``h`` [tokens, num_experts * expert_size] (selected slots first, as from
    :func:`expert_matvec`) times the selected experts' rows of ``weight_t``."""
    hidden = weight_t.shape[1]
    width = order.numel() * expert_size
    h = h.reshape(-1, width).contiguous()
    tokens = h.shape[0]
    out = torch.empty(tokens, hidden, dtype=weight_t.dtype, device=weight_t.device)
    if tokens == 1:
        _expert_matvec_t_kernel[(triton.cdiv(hidden, BLOCK_H),)](h, weight_t, order, count, out, hidden,
                                                                 EXPERT_SIZE=expert_size,
                                                                 ES_PAD=triton.next_power_of_2(expert_size), BLOCK=BLOCK_H)
    elif tokens <= MAX_TOKENS:
        _expert_matmul_t_kernel[(triton.cdiv(hidden, 64),)](h, weight_t, order, count, out, tokens, hidden, width,
                                                            EXPERT_SIZE=expert_size, ES_PAD=_dot_size(expert_size),
                                                            T_PAD=_dot_size(tokens), BLOCK=64)
    else:
        raise ValueError(f"{tokens} tokens: the Triton kernels take 1 to {MAX_TOKENS}")
    return out
