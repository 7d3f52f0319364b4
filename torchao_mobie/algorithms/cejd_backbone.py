"""CEJD's shared backbone: its joint-SVD start, least-squares refits and stored dtype (MoBiE §4.1).

For fixed binary factors the backbone is a least-squares problem on the layer output error (output
side in closed form per diagonal block, input side by preconditioned conjugate gradient); the driver
(:mod:`.cejd`) alternates it with the factor fits (:mod:`.cejd_factor`).
"""

from __future__ import annotations

import torch

from .backbone_chunked import InputSideSystem, output_side_sums
from .cejd_factor import _solve
from .chunks import chunk_budget

__all__ = ["init_backbone", "refit_backbone", "quantize_backbone"]


def quantize_backbone(M: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Round a backbone to its stored dtype. Returns (stored values, per-row fp16 scale or None, dequantized fp32)."""
    if dtype == "float32":
        return M.clone(), None, M.clone()
    if dtype == "bfloat16":
        s = M.to(torch.bfloat16)
        return s, None, s.float()
    if dtype == "int8":
        scale = (M.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12).half().float()
        q = torch.clamp(torch.round(M / scale), -127, 127).to(torch.int8)
        return q, scale.squeeze(-1).half(), q.float() * scale
    raise ValueError(f"unknown backbone dtype {dtype!r}")



def _split(blocks: int, k: int):
    sz = k // blocks
    return [(i * sz, (i + 1) * sz) for i in range(blocks)]


def refit_backbone(W, H, Q, backbone_blocks, side: str, G=None, cg_iters: int = 60, ridge: float = 1e-8,
                   tol: float = 1e-3):
    """Least-squares backbone for fixed factors ``Q [E, m, n]`` on ``Σ_e tr(G ΔW_e H_e ΔW_eᵀ)``.

    Output side: closed form per diagonal block ``M = (Σ W H Qᵀ)(Σ Q H Qᵀ)⁻¹`` (G cancels: M is
    unconstrained inside its block). Input side: ``Σ_e Q_eᵀ G Q_e S H_e = Σ_e Q_eᵀ G W_e H_e`` solved
    by conjugate gradient warm-started at the current S (never increases the objective), preconditioned
    with the nearest Kronecker product of the operator (:func:`_kronecker_preconditioner`) and stopped
    when a step gains less than ``tol`` of the decrease so far.
    """
    E, m, n = W.shape
    if side == "output":
        big = E * 8 * (n * n + 3 * m * n + 2 * m * m) > chunk_budget()  # the batched [E, m, m] terms
        W64, H64, Q64 = (None,) * 3 if big else (W.double(), H.double(), Q.double())
        out = []
        for blk, (s0, s1) in zip(backbone_blocks, _split(backbone_blocks.shape[0], W.shape[1])):
            if big:
                num, den = output_side_sums(W, H, Q, s0, s1)
            else:
                Qb, Wb = Q64[:, s0:s1], W64[:, s0:s1]
                num = (Wb @ H64 @ Qb.transpose(-1, -2)).sum(0)
                den = (Qb @ H64 @ Qb.transpose(-1, -2)).sum(0)
            den = den + ridge * den.diagonal().mean() * torch.eye(den.shape[0], dtype=den.dtype)
            out.append(_solve(den, num.t()).t())
        return torch.stack(out).to(W.dtype)
    # input side (single block)
    if E * 8 * (4 * n * n + 3 * m * n) > chunk_budget():  # the batched [E, n, n] Grams and products
        return _refit_input_chunked(W, H, Q, backbone_blocks, G, cg_iters, ridge, tol)
    W64, H64, Q64 = W.double(), H.double(), Q.double()
    S = backbone_blocks[0].double()
    GQ = Q64 if G is None else G.double() @ Q64
    K = Q64.transpose(-1, -2) @ GQ  # [E, n, n]
    rhs = (GQ.transpose(-1, -2) @ W64 @ H64).sum(0)
    trK = K.diagonal(dim1=-2, dim2=-1).sum(-1)
    trH = H64.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam = ridge * float((trK * trH).sum()) / S.numel()

    K32, H32 = K.float(), H64.float()

    def op(X):  # fp32 products (2x faster); the CG recursion and scalars stay fp64
        return (K32 @ X.float() @ H32).sum(0).double() + lam * X

    precond = _kronecker_preconditioner(K, H64, lam)
    return _pcg(op, precond, rhs, S, cg_iters, tol).unsqueeze(0).to(W.dtype)


def _refit_input_chunked(W, H, Q, backbone_blocks, G, cg_iters: int, ridge: float, tol: float):
    """The input-side refit with the sums over experts taken by chunks (:mod:`.backbone_chunked`)."""
    S = backbone_blocks[0].double()
    sys_ = InputSideSystem(W, H, Q, G)
    lam = ridge * float((sys_.trK * sys_.trH).sum()) / S.numel()
    precond = _kronecker_inverse(*sys_.kronecker_factors(), lam)
    return _pcg(lambda X: sys_.apply(X) + lam * X, precond, sys_.rhs, S, cg_iters, tol).unsqueeze(0).to(W.dtype)


def _pcg(op, precond, rhs, S, cg_iters: int, tol: float):
    """Preconditioned conjugate gradient for ``op(X) = rhs`` from ``S``, stopped when a step gains less than
    ``tol`` of the decrease so far."""
    X = S.clone()
    R = rhs - op(X)
    Z = precond(R)
    P = Z.clone()
    rz = (R * Z).sum()
    gained = 0.0
    for _ in range(cg_iters):
        AP = op(P)
        pap = (P * AP).sum()
        if pap <= 0:
            break
        alpha = rz / pap
        X = X + alpha * P
        R = R - alpha * AP
        step = float(alpha * rz)  # twice this step's decrease of the quadratic
        gained += step
        if step <= tol * gained:
            break
        Z = precond(R)
        rz_new = (R * Z).sum()
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return X


def _kronecker_preconditioner(K, H, lam):
    """Inverse of the nearest Kronecker product ``K̄ ⊗ H̄ ≈ Σ_e K_e ⊗ H_e`` (a few alternating rank-1
    steps of Van Loan's rearrangement), applied as ``R ↦ K̄⁻¹ R H̄⁻¹``. The experts' metrics are similar
    (that is CEJD's premise), so this is close to the operator: on mixtral-8e gate_up, 10 iterations
    reach the exact solution's objective where Jacobi-preconditioned CG needs over 60."""
    Hb = H.mean(0)
    for _ in range(3):
        w = (H * Hb).sum((-2, -1)) / (Hb * Hb).sum().clamp_min(1e-300)
        Kb = (w[:, None, None] * K).sum(0)
        v = (K * Kb).sum((-2, -1)) / (Kb * Kb).sum().clamp_min(1e-300)
        Hb = (v[:, None, None] * H).sum(0)
    return _kronecker_inverse(Kb, Hb, lam)


def _kronecker_inverse(Kb, Hb, lam):
    """``R ↦ K̄⁻¹ R H̄⁻¹`` with the damping of :func:`_kronecker_preconditioner`."""
    eye = torch.eye(Kb.shape[0], dtype=Kb.dtype)
    hd = float(Hb.diagonal().mean().clamp_min(1e-300))
    kd = float(Kb.diagonal().mean().clamp_min(1e-300))
    Ki = torch.cholesky_inverse(torch.linalg.cholesky(Kb + (1e-6 * kd + lam / hd) * eye))
    Hi = torch.cholesky_inverse(torch.linalg.cholesky(Hb + 1e-6 * hd * torch.eye(Hb.shape[0], dtype=Hb.dtype)))
    return lambda R: Ki @ R @ Hi


def init_backbone(W, H, side: str, blocks: int = 1):
    """Joint SVD init: input side ``S = Σ Vᵀ`` of the vertically stacked experts ``[E·m, n]``; output side
    ``M = U Σ`` (per diagonal block) of the horizontally stacked experts ``[m, E·n]``. ``H`` is unused
    (the least-squares refits bring the data in)."""
    E, m, n = W.shape
    if side == "input":
        st = W.reshape(E * m, n).double()
        _, Sv, Vh = torch.linalg.svd(st, full_matrices=False)
        return (Sv[:, None] * Vh).unsqueeze(0).to(W.dtype)
    out = []
    for s0, s1 in _split(blocks, m):
        st = W[:, s0:s1].permute(1, 0, 2).reshape(s1 - s0, E * n).double()
        U, Sv, _ = torch.linalg.svd(st, full_matrices=False)
        out.append((U * Sv[None, :]).to(W.dtype))
    return torch.stack(out)

