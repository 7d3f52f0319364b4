"""The OBC/GPTQ block loop shared by BiLLM and ARB-LLM.

Columns are quantized in blocks of ``blocksize``; a block is quantized all at once (no propagation
inside the block, as BiLLM does) and its error, weighted by the inverse Hessian, is pushed onto the
columns not yet quantized so that later blocks absorb it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .result import BitBudget

BlockFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, BitBudget]]


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01, name: str = "weight") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1 with damp = percdamp * mean(diag H), as GPTQ.

    A singular H (few calibration tokens, rank-deficient inputs) is retried with 10x the damping, up
    to four times; a Hessian that is not finite or still fails raises a ValueError naming ``name``.
    ``H`` must already have its dead columns fixed (H_jj = 1).
    """
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: Hessian has non-finite entries")
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for k in range(5):
        damp = (percdamp if k == 0 else max(percdamp, 1e-3) * 10**k) * mean_diag
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
    raise ValueError(f"{name}: Hessian is not positive definite even with damping {damp.item():.3g}")


def quantize_blockwise(
    W: torch.Tensor,
    H: torch.Tensor,
    fn: BlockFn,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    name: str = "weight",
) -> tuple[torch.Tensor, BitBudget]:
    """Quantize ``W`` [out, in] (or a stack ``[E, out, in]`` with ``H`` [E, in, in]) block by block with
    ``fn`` and compensate later columns.

    ``fn(W_blk, hinv_diag_blk, H_blk) -> (Q_blk, BitBudget)`` receives the current (compensated)
    block, the diagonal of the block of the upper Cholesky factor of H^-1 (BiLLM's saliency divisor)
    and the raw Hessian block (ARB-X's S, up to scale). Dead inputs (H_jj == 0) get H_jj = 1 and a
    zeroed weight column, as GPTQ. After each block, ``W[:, ed:] -= Err @ Hinv[st:ed, ed:]`` with
    ``Err = (W_blk - Q_blk) / hinv_diag``; ``compensate=False`` skips that (BiLLM's disable_gptq).
    For a stack, ``fn`` gets ``[E, out, c]``, ``[E, c]`` and ``[E, c, c]`` and the experts' factors are
    computed one by one (each with its own damping retries). Returns the fp32 dequantized matrix
    and the summed bit budget.
    """
    W = W.detach().float().clone()
    H = H.detach().float().to(W.device)
    n = W.shape[-1]
    if W.dim() not in (2, 3) or H.shape != (*W.shape[:-2], n, n):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    Hfix = H.clone()
    torch.diagonal(Hfix, dim1=-2, dim2=-1).masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(-2), 0)
    if W.dim() == 2:
        U = inverse_hessian_factor(Hfix, percdamp, name)
    else:
        U = torch.stack([inverse_hessian_factor(h, percdamp, f"{name}[expert {e}]") for e, h in enumerate(Hfix)])
    diag = torch.diagonal(U, dim1=-2, dim2=-1)

    Q = torch.empty_like(W)
    budget = BitBudget()
    for st in range(0, n, blocksize):
        ed = min(st + blocksize, n)
        d = diag[..., st:ed]
        Qb, b = fn(W[..., st:ed], d, H[..., st:ed, st:ed])
        if not torch.isfinite(Qb).all():
            raise ValueError(f"{name}: non-finite values in quantized block [{st}:{ed}]")
        if compensate:
            W[..., ed:] -= ((W[..., st:ed] - Qb) / d.unsqueeze(-2)) @ U[..., st:ed, ed:]
        Q[..., st:ed] = Qb
        budget = budget + b
    return Q, budget
