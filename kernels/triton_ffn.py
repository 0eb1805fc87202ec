"""Triton kernels for batch-1 sparse FFN decoding on GPU, over expert-contiguous weights.

The selection stays on the device: :func:`select_experts` orders the experts so the selected
ones come first and counts them, both as device tensors, and the kernels read that count. No
host synchronisation, no ``nonzero()``, and fixed launch grids, so a decoding step can be
captured in a CUDA graph.

* :func:`expert_matvec`: ``y[slot*E + i] = weight[offset + expert(slot)*E + i] . x`` for the
  selected slots; one program per expert slot (programs past the count exit at once). ``y``
  has room for every expert and is zero past the selected ones, so elementwise activations
  on it keep those entries at zero.
* :func:`expert_matvec_t`: ``out = sum over selected slots of y[slot rows] @ weight_t[expert
  rows]``; one program per column block loops over the selected experts in order, so the sum
  is deterministic (no atomics).

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
    """(order, count) for a [experts] bool mask: selected experts first, in index order."""
    on = on.reshape(-1)
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


def expert_matvec(x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, expert_size: int,
                  offset: int = 0) -> torch.Tensor:
    """[num_experts * expert_size]: the selected experts' rows of ``weight @ x`` first, then zeros."""
    hidden = weight.shape[1]
    num_experts = order.numel()
    y = torch.zeros(num_experts * expert_size, dtype=weight.dtype, device=weight.device)
    _expert_matvec_kernel[(num_experts,)](x.reshape(-1).contiguous(), weight, order, count, y, hidden, offset,
                                          EXPERT_SIZE=expert_size, ES_PAD=triton.next_power_of_2(expert_size),
                                          BLOCK=BLOCK_H)
    return y


def expert_matvec_t(h: torch.Tensor, weight_t: torch.Tensor, order: torch.Tensor, count: torch.Tensor,
                    expert_size: int) -> torch.Tensor:
    """[hidden]: ``h`` (selected experts' activations first, as from :func:`expert_matvec`) times
    the selected experts' rows of ``weight_t``."""
    hidden = weight_t.shape[1]
    out = torch.empty(hidden, dtype=weight_t.dtype, device=weight_t.device)
    _expert_matvec_t_kernel[(triton.cdiv(hidden, BLOCK_H),)](h.reshape(-1).contiguous(), weight_t, order, count, out, hidden,
                                                             EXPERT_SIZE=expert_size,
                                                             ES_PAD=triton.next_power_of_2(expert_size), BLOCK=BLOCK_H)
    return out
