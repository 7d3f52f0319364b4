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
    """Quantize ``W`` [out, in] block by block with ``fn`` and compensate later columns.

    ``fn(W_blk, hinv_diag_blk, H_blk) -> (Q_blk, BitBudget)`` receives the current (compensated)
    block, the diagonal of the block of the upper Cholesky factor of H^-1 (BiLLM's saliency divisor)
    and the raw Hessian block (ARB-X's S, up to scale). Dead inputs (H_jj == 0) get H_jj = 1 and a
    zeroed weight column, as GPTQ. After each block, ``W[:, ed:] -= Err @ Hinv[st:ed, ed:]`` with
    ``Err = (W_blk - Q_blk) / hinv_diag``; ``compensate=False`` skips that (BiLLM's disable_gptq).
    Returns the fp32 dequantized matrix and the summed bit budget.
    """
    W = W.detach().float().clone()
    H = H.detach().float().to(W.device)
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    dead = torch.diag(H) == 0
    Hfix = H.clone()
    Hfix[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(Hfix, percdamp, name)

    Q = torch.empty_like(W)
    budget = BitBudget()
    for st in range(0, W.shape[1], blocksize):
        ed = min(st + blocksize, W.shape[1])
        d = torch.diag(U)[st:ed]
        Qb, b = fn(W[:, st:ed], d, H[st:ed, st:ed])
        if not torch.isfinite(Qb).all():
            raise ValueError(f"{name}: non-finite values in quantized block [{st}:{ed}]")
        if compensate:
            W[:, ed:] -= ((W[:, st:ed] - Qb) / d) @ U[st:ed, ed:]
        Q[:, st:ed] = Qb
        budget = budget + b
    return Q, budget
