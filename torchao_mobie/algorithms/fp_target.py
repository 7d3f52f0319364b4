"""Full-precision output target: fit each binarized expert to what the full-precision model computed.

A GPTQ-style fit minimises ``tr(ΔW H ΔWᵀ)`` with ``H = Σ x_q x_qᵀ`` over the quantized model's own inputs: it
reproduces ``W x_q``, so the error that the binarized layers before it (and, for ``down_proj``, the expert's
own binarized ``gate_up_proj``) already put into ``x_q`` stays in the output. The full-precision model
computed ``W x_fp`` on the same tokens, and ``Σ ||Q x_q − W x_fp||²`` is the same quadratic in ``Q`` with the
weight replaced by the least-squares target ``W' = W C H⁻¹``, ``C = Σ x_fp x_qᵀ`` (asymmetric calibration, as
in GPTAQ). So every later stage (GLAS, NGES, CEJD, the planner) runs unchanged on ``W'``; the stored format
and the bits do not change. A ridge toward ``W`` keeps experts with few tokens near their own weight.
"""

from __future__ import annotations

import torch

__all__ = ["fp_target_weight"]


@torch.no_grad()
def fp_target_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, ridge: float,
                     skip=()) -> torch.Tensor:
    """``W' = argmin Σ ||W' x_q − W x_fp||² + λ||W' − W||²_F = W (C + λI)(H + λI)⁻¹`` per expert, with
    ``λ = ridge · mean(diag H_e)``.

    W: ``[E, out, in]``; H: ``[E, in, in]`` mean ``x_q x_qᵀ``; C: ``[E, in, in]`` mean ``x_fp x_qᵀ`` over the
    same tokens; skip: experts left as they are (no or too few tokens: their H is a fallback). Returns a
    new fp32 tensor; ``C == H`` (nothing binarized upstream) gives ``W`` back.
    """
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]) or C.shape != H.shape:
        raise ValueError(f"fp_target_weight: W {tuple(W.shape)}, H {tuple(H.shape)} and C {tuple(C.shape)} do not "
                         "match ([E, out, in], [E, in, in], [E, in, in])")
    if not ridge > 0:
        raise ValueError(f"fp_target_weight: ridge must be > 0, got {ridge!r}")
    out = W.detach().float().clone()
    skip = set(skip)
    eye = torch.eye(W.shape[2], dtype=torch.float64, device=W.device)
    for e in range(W.shape[0]):
        h = H[e].double()
        lam = ridge * float(h.diagonal().mean())
        if e in skip or not lam > 0:
            continue
        w = W[e].double()
        out[e] = torch.linalg.solve(h + lam * eye, (w @ (C[e].double() + lam * eye)).T).T.float()
    return out
