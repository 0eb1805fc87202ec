"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with second-order weight updates.

For a linear layer ``y = W x`` and calibration inputs ``X``, ``H = X^T X`` is the Hessian of the
layer-wise reconstruction error. Columns are processed left to right in blocks: within a block,
the weights with the smallest ``w^2 / [H^-1]_jj^2`` are masked (unstructured: across the whole
block, so sparsity is uniform per block; N:M: the N smallest of each group of M in a row), and
each pruned column's error is spread over the not-yet-processed columns through the Cholesky
factor of ``H^-1``. Settings as in the reference code: dampening 1% of the mean diagonal (more,
repeatedly, when the factorisation fails), block size 128, dead inputs zeroed.
"""

from __future__ import annotations

import torch


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding ``damp * I`` until the factorisation succeeds."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    total = damp
    for _ in range(20):
        try:
            L = torch.linalg.cholesky(H + total * eye)
            inverse = torch.cholesky_inverse(L)
            upper = torch.linalg.cholesky(inverse, upper=True)
            if torch.isfinite(upper).all():
                return upper
        except torch.linalg.LinAlgError:
            pass
        total += damp
    raise RuntimeError("SparseGPT: the Hessian stayed singular after repeated dampening")


@torch.no_grad()
def prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """A pruned copy of ``weight`` [out, in] given ``hessian`` [in, in] (``X^T X``, any scale).

    ``sparsity``: unstructured fraction of zeros; or ``n_m=(N, M)``: N zeros in every M inputs.
    """
    if n_m is not None and block_size % n_m[1]:
        raise ValueError(f"block_size={block_size} must be a multiple of M={n_m[1]} for {n_m[0]}:{n_m[1]} sparsity")
    W = weight.detach().float().contiguous().clone()
    H = hessian.detach().clone().float()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp * float(torch.diag(H).mean()))
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        errors = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        diag = torch.diag(Hinv1)
        if n_m is None:
            score = W1.square() / diag.square()
            k = int(score.numel() * sparsity)
            mask = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
            if k > 0:
                mask.view(-1)[score.reshape(-1).argsort()[:k]] = True
        else:
            n, m = n_m
            mask = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                group = W1[:, i : i + m].square() / diag[i : i + m].square()
                mask[:, i : i + m].scatter_(1, group.topk(n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.clone()
            q[mask[:, i]] = 0
            Q1[:, i] = q
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, start:end] = Q1
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return W.to(weight.dtype)
