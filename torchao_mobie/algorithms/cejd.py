"""CEJD: cross-expert joint decomposition (MoBiE §4.1, reconstructed; see design/paper_and_baselines.md §2).

For one projection of one MoE layer with experts ``W_e [m, n]`` and input Hessians ``H_e [n, n]``:

* a **shared backbone** is put on the cheaper side:
    - input side (``n <= m``):  ``W_e ≈ Q_e · S``,  ``S [n, n]`` (init: ``Σ Vᵀ`` of the SVD of the
      vertically stacked experts ``[E·m, n]``);
    - output side (``m < n``):  ``W_e ≈ M · Q_e``,  ``M [m, m]`` (init: ``U Σ`` of the SVD of the
      horizontally stacked experts ``[m, E·n]``); ``M`` may be block diagonal (``blocks`` diagonal
      blocks, e.g. 2 = separate gate and up backbones for ``gate_up_proj``);
* the **per-expert factor** is binary with row and column scales, no mean:
  ``Q_e = diag(row_scale_e) · sign_e · diag(col_scale_e)`` (optionally plus a second residual plane
  ``diag(row_scale_e) · sign2_e · diag(col_scale2_e)`` on the few factor columns with the most
  output-error energy, BiLLM-style salient columns; all ``n`` columns = a full second plane);
* everything minimizes the *original* layer's output error
  ``f = Σ_e tr(G (W_e − Ŵ_e) H_e (W_e − Ŵ_e)ᵀ)`` (``G = I``, or NGES's output metric): the factor
  sees the transformed metrics (input side: right metric ``S H_e Sᵀ``; output side: left metric
  ``Mᵀ G M``), signs are chosen with GPTQ/OBC error compensation column by column inside the factor,
  then improved by greedy sign coordinate descent on ``f`` (:func:`refine_signs`), row/column scales are
  refit in closed form on ``f``, the backbone by least squares on ``f`` (output side closed form, input
  side conjugate gradient), alternating; finally the backbone is rounded to its stored dtype and the
  scales refit against the stored backbone and the factor polished against it; the scales are stored
  as log-uniform 8-bit codes (:mod:`~torchao_mobie.algorithms.scale_codes`).

Reconstruction (exact, documented; see :func:`reconstruct`)::

    Q_e      = row_scale[e][:, None] * (sign[e] * col_scale[e][None, :]
                                        + Σ_p sign_x[e, p] * col_scale_x[e, p][None, :]
                                        + sign2[e] * col_scale2[e][None, :])   (fp16 scales, ±1 signs;
                                                                                 sign_x / sign2 optional)
    W_hat[e] = backbone @ Q_e   (side "output")      W_hat[e] = Q_e @ backbone   (side "input")

with ``backbone`` the block-diagonal matrix of the stored blocks, dequantized from its stored dtype
(bfloat16, or int8 with one fp16 scale per row: ``backbone = int8 * scale[:, None]``), and the fp16
scales decoded from their 8-bit codes (``row_code``, ``col_code``, ``col_code2``, ``col_code_x`` and the
per-expert ``scale_grid [E, 3 + P, 2]``, see :func:`~torchao_mobie.algorithms.scale_codes.decode_log8`).
All computations are fp32/fp64 batched over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .result import BitBudget
from .scale_codes import CODE_BITS, GRID_FP16_PER_EXPERT, decode_log8, encode_log8

__all__ = ["CEJDResult", "cejd_quantize", "reconstruct", "backbone_matrix", "layer_objective", "factor_metrics",
           "init_backbone", "refit_backbone", "gptq_signs", "refine_signs", "refit_scales", "quantize_backbone",
           "select_salient", "choose_side"]

FP16 = 16


def _solve(A, B):
    """``torch.linalg.solve`` with batched CPU systems solved on one thread: torch 2.13's batched CPU LU
    (oneMKL getrf/getrs) with more than one thread raises "Pivots given to lu_solve must all be greater
    or equal to 1" or returns garbage once n >= ~160 (e.g. [8, 192, 192] fp32/fp64 on 2 threads), while
    Cholesky, SVD and unbatched solves are fine. One thread also keeps results independent of the
    thread count."""
    if A.dim() > 2 and A.shape[0] > 1 and A.device.type == "cpu" and torch.get_num_threads() > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.linalg.solve(A, B)
        finally:
            torch.set_num_threads(threads)
    return torch.linalg.solve(A, B)


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _blockdiag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


def _sym(x):
    return 0.5 * (x + x.transpose(-1, -2))


def layer_objective(W, What, H, G=None, per_expert: bool = False) -> torch.Tensor:
    """``Σ_e tr(G ΔW_e H_e ΔW_eᵀ)`` (G = identity when None); ``[E]`` terms if ``per_expert``. Products in
    fp32 (the error is formed first, so nothing cancels), sums in float64."""
    D = (W - What).float()
    DH = D @ H.float()
    if G is not None:
        D = G.float() @ D
    terms = (D * DH).sum((-2, -1), dtype=torch.float64)
    return terms if per_expert else terms.sum()


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


def backbone_bits(shape, dtype: str) -> int:
    """Stored bits of backbone blocks ``[nb, k, k]`` (int8 adds one fp16 scale per row)."""
    nb, k, k2 = shape
    per = {"float32": 32, "bfloat16": 16, "int8": 8}[dtype]
    return nb * k * k2 * per + (nb * k * FP16 if dtype == "int8" else 0)


# ---------------------------------------------------------------------------------------------------
# factor problem:  minimize  tr(Gf Q Hf Qᵀ) − 2 tr(Qᵀ T)   over Q = diag(a) B diag(b)
# ---------------------------------------------------------------------------------------------------


@dataclass
class FactorMetrics:
    Gf: torch.Tensor | None  # [E, m, m] left metric of the factor (None = identity)
    Hf: torch.Tensor  # [E, n, n] right metric of the factor
    T: torch.Tensor  # [E, m, n] cross term  Gf A Hf
    A: torch.Tensor  # [E, m, n] unconstrained optimal factor (GPTQ target)


def factor_metrics(W, H, backbone, side: str, G=None, ridge: float = 1e-6) -> FactorMetrics:
    """Metrics of the per-expert factor for a fixed (dequantized, full) backbone ``[k, k]``."""
    if side == "input":
        S = backbone
        Hf = _sym(S @ H @ S.t())
        GW = W if G is None else G @ W
        T = GW @ H @ S.t()
        Gf = G.expand(W.shape[0], -1, -1) if G is not None else None
        # A = W H Sᵀ (S H Sᵀ)⁻¹ (least-squares factor in the H metric)
        damp = ridge * Hf.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
        eye = torch.eye(Hf.shape[-1], dtype=Hf.dtype)
        A = _solve(Hf + damp * eye, (W @ H @ S.t()).transpose(-1, -2)).transpose(-1, -2)
    else:
        M = backbone
        GM = M if G is None else G @ M
        Gf0 = _sym(M.t() @ GM)
        Gf = Gf0.expand(W.shape[0], -1, -1)
        Hf = H
        T = GM.t() @ W @ H
        damp = ridge * Gf0.diagonal().mean().clamp_min(1e-30)
        A = _solve(Gf0 + damp * torch.eye(Gf0.shape[0], dtype=Gf0.dtype), GM.t() @ W)
    return FactorMetrics(Gf, Hf, T, A)


def _upper_inv_chol(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Batched upper Cholesky factor of (H + damp I)⁻¹ (GPTQ), damping escalated on failure."""
    n = H.shape[-1]
    eye = torch.eye(n, dtype=H.dtype)
    md = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    for k in range(6):
        damp = (percdamp if k == 0 else max(percdamp, 1e-3) * 10 ** k) * md
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info.abs().sum()) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info.abs().sum()) == 0 and torch.isfinite(U).all():
                return U
    raise ValueError("factor Hessian is not positive definite even with damping")


def gptq_signs(A, Hf, row_scale, row_weight=None, percdamp: float = 0.01, salient=None, block: int = 32):
    """Signs of ``A ≈ diag(a) (B diag(b) + B2 diag(b2))`` chosen column by column with OBC/GPTQ error
    compensation (columns in their natural order; lazy batched updates every ``block`` columns).

    ``row_scale a [E, m]`` is fixed; the column scale ``b_j`` is the weighted least-squares optimum of
    column j given its signs (``row_weight`` = diagonal of the factor's left metric). Columns in
    ``salient [E, n]`` (bool) get a second residual plane ``B2`` with its own column scale ``b2``
    (zero elsewhere). Returns (B, b, B2, b2).
    """
    return _gptq(A, Hf, row_scale, row_weight, percdamp, salient, block)[:4]


def _gptq(A, Hf, row_scale, row_weight=None, percdamp: float = 0.01, salient=None, block: int = 32, extra: int = 0):
    """:func:`gptq_signs` with ``extra`` full residual planes between the first plane and the salient one:
    returns (B, b, B2, b2, X [E, extra, m, n], x [E, extra, n])."""
    E, m, n = A.shape
    X = torch.zeros(E, extra, m, n, dtype=A.dtype)
    xbeta = torch.zeros(E, extra, n, dtype=A.dtype)
    U = _upper_inv_chol(Hf, percdamp)
    Wc = A.clone()
    B = torch.empty_like(A)
    B2 = torch.zeros_like(A)
    beta = torch.empty(E, n, dtype=A.dtype)
    beta2 = torch.zeros(E, n, dtype=A.dtype)
    a = row_scale
    wa = a if row_weight is None else a * row_weight
    den = (wa * a).sum(-1).clamp_min(1e-30)
    salf = None if salient is None else salient.to(A.dtype)
    for s0 in range(0, n, block):
        s1 = min(n, s0 + block)
        W1 = Wc[:, :, s0:s1].clone()
        Err = torch.zeros_like(W1)
        for jj in range(s1 - s0):
            j = s0 + jj
            w = W1[:, :, jj]
            s = _sign(w)
            b = (wa * w.abs()).sum(-1) / den
            q = a * s * b[:, None]
            B[:, :, j] = s
            beta[:, j] = b
            for p in range(extra):  # each further full plane binarizes what the planes before it left
                r = w - q
                sp = _sign(r)
                bp = (wa * r.abs()).sum(-1) / den
                q = q + a * sp * bp[:, None]
                X[:, p, :, j] = sp
                xbeta[:, p, j] = bp
            if salf is not None:
                r = w - q
                s2 = _sign(r)
                b2 = (wa * r.abs()).sum(-1) / den * salf[:, j]
                q = q + a * s2 * b2[:, None]
                B2[:, :, j] = s2 * salf[:, j, None]
                beta2[:, j] = b2
            err = (w - q) / U[:, j, j][:, None]
            Err[:, :, jj] = err
            if jj + 1 < s1 - s0:
                W1[:, :, jj + 1:] -= err[:, :, None] * U[:, j, None, j + 1:s1]
        if s1 < n:
            Wc[:, :, s1:] -= Err @ U[:, s0:s1, s1:]
    return B, beta, B2, beta2, X, xbeta


def _factor(a, B, b, B2=None, b2=None):
    C = B * b[:, None, :]
    if B2 is not None:
        C = C + B2 * b2[:, None, :]
    return a[:, :, None] * C


def refit_scales(B, a, b, fm: FactorMetrics, rounds: int = 2, ridge: float = 1e-6, B2=None, b2=None, salient=None):
    """Closed-form alternating refit of row scales ``a`` then column scales ``b`` (and ``b2`` of the
    second plane on ``salient`` columns) on the factor objective ``tr(Gf Q Hf Qᵀ) − 2 tr(Qᵀ T)``."""
    E, m, n = B.shape
    Hf, Gf, T = fm.Hf, fm.Gf, fm.T
    two = B2 is not None and salient is not None and bool(salient.any())
    if two:
        k = int(salient.sum(-1).max())
        if bool((salient.sum(-1) != k).any()):
            raise ValueError("refit_scales: every expert must have the same number of salient columns")
        idx = salient.nonzero(as_tuple=True)[1].view(E, k)  # [E, k], ascending (row-major order)
        cidx = torch.cat([torch.arange(n).expand(E, n), idx], -1)  # [E, n + k]
    for _ in range(rounds):
        C = B * b[:, None, :] + (B2 * b2[:, None, :] if two else 0)
        CH = C @ Hf
        if Gf is None:
            num = (C * T).sum(-1)
            den = (CH * C).sum(-1)
            a = torch.where(den > 0, num / den.clamp_min(1e-30), a)
        else:
            K = Gf * (CH @ C.transpose(-1, -2))
            r = (C * T).sum(-1)
            K = K + ridge * K.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * torch.eye(m, dtype=K.dtype)
            a = _solve(K, r.unsqueeze(-1)).squeeze(-1)
        P = B * a[:, :, None]
        if two:  # unknowns: n first-plane column scales + the k second-plane scales of the salient columns
            P = torch.cat([P, torch.gather(B2, 2, idx[:, None, :].expand(-1, m, -1)) * a[:, :, None]], -1)
            Hx = torch.gather(torch.gather(Hf, 1, cidx[:, :, None].expand(-1, -1, n)), 2,
                              cidx[:, None, :].expand(-1, cidx.shape[1], -1))
            Tx = torch.gather(T, 2, cidx[:, None, :].expand(-1, m, -1))
        else:
            Hx, Tx = Hf, T
        PGP = P.transpose(-1, -2) @ P if Gf is None else P.transpose(-1, -2) @ Gf @ P
        K = PGP * Hx
        r = (P * Tx).sum(-2)
        nk = K.shape[-1]
        K = K + ridge * K.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * torch.eye(nk, dtype=K.dtype)
        x = _solve(K, r.unsqueeze(-1)).squeeze(-1)
        b = x[:, :n]
        if two:
            b2 = torch.zeros_like(b).scatter(1, idx, x[:, n:])
    # canonical form: non-negative scales (signs folded into the sign matrices)
    B = torch.where((b < 0)[:, None, :], -B, B)
    b = b.abs()
    if two:
        B2 = torch.where((b2 < 0)[:, None, :], -B2, B2)
        b2 = b2.abs()
    nega = (a < 0)[:, :, None]
    B = torch.where(nega, -B, B)
    if B2 is not None:
        B2 = torch.where(nega, -B2, B2)
    a = a.abs()
    return B, a, b, B2, b2


def refine_signs(B, a, b, fm: "FactorMetrics", sweeps: int = 2, B2=None, b2=None, block: int = 32,
                 cols: int | None = None):
    """Greedy coordinate descent on the first-plane signs (scales fixed): flip ``B_ij`` when it lowers
    ``tr(Gf Q Hf Qᵀ) − 2 tr(Qᵀ T)``; one column at a time, all rows of the column at once (exact when
    the left metric is the identity; with a left metric the flips of one column are screened row by row).
    The gradient is updated lazily in blocks of ``block`` columns (one matmul per block); ``cols``: only the
    first ``cols`` columns are flipped (the first plane of stacked planes)."""
    Hf, Gf, T = fm.Hf, fm.Gf, fm.T
    E, m, n = B.shape
    Q = _factor(a, B, b, B2, b2)
    g = (Q @ Hf if Gf is None else Gf @ Q @ Hf) - T
    hd = Hf.diagonal(dim1=-2, dim2=-1)
    # curvature of a flip of entry (i, j): delta² · Gf_ii · Hf_jj
    curv = hd[:, None, :] if Gf is None else Gf.diagonal(dim1=-2, dim2=-1)[:, :, None] * hd[:, None, :]
    # the left metric is one matrix shared by every expert (factor_metrics expands it): one [E, m] @ [m, m]
    # product per column reads it once instead of once per expert
    G1 = Gf[0] if Gf is not None and Gf.stride(0) == 0 else None
    for _ in range(sweeps):
        nflip = 0
        # the change of entry (i, j) if flipped; column j of B only changes while column j is visited
        Delta = 2 * a[:, :, None] * b[:, None, :] * B
        for s0 in range(0, n if cols is None else cols, block):
            s1 = min(n if cols is None else cols, s0 + block)
            w = s1 - s0
            # flipping (i, j) lowers f iff delta·g > delta²·curv / 2, with g the gradient as of column j's
            # turn; the right side is fixed for the block, so it is formed at once. Columns are rows of
            # transposed [E, w, m] copies (contiguous per column: 20-35% faster than strided columns)
            D = Delta[:, :, s0:s1].transpose(1, 2).contiguous()
            lim = (D * D * curv[:, :, s0:s1].transpose(1, 2)).mul_(0.5)
            gb = g[:, :, s0:s1].transpose(1, 2).contiguous()
            Hb = Hf[:, s0:s1, s0:s1]
            for jj in range(w):
                dv = D[:, jj]
                dv.mul_(dv * gb[:, jj] > lim[:, jj])  # D[:, jj] becomes the accepted change of column j
                if jj + 1 < w:
                    # Gf is symmetric; a row-vector product is ~10x faster than a batched matvec on CPU
                    gdv = dv if Gf is None else (dv @ G1 if G1 is not None else (dv.unsqueeze(1) @ Gf).squeeze(1))
                    gb[:, jj + 1:] -= Hb[:, jj + 1:, jj, None] * gdv[:, None, :]
            D = D.transpose(1, 2)
            flipped = D != 0
            if not bool(flipped.any()):
                continue
            nflip += int(flipped.sum())
            B[:, :, s0:s1] = torch.where(flipped, -B[:, :, s0:s1], B[:, :, s0:s1])
            GD = D if Gf is None else Gf @ D
            g -= GD @ Hf[:, s0:s1, :]
        if nflip == 0:
            break
    return B


def _init_scales(A):
    a = A.abs().mean(-1).clamp_min(1e-12)
    b = (A.abs() / a[:, :, None]).mean(-2)
    return a, b


def select_salient(fm: "FactorMetrics", k: int):
    """Per expert, the ``k`` factor columns carrying the most output-error energy ``‖A_j‖² · Hf_jj``."""
    E, m, n = fm.A.shape
    if k <= 0:
        return None
    en = fm.A.pow(2).sum(1) * fm.Hf.diagonal(dim1=-2, dim2=-1)
    idx = en.topk(min(k, n), -1).indices
    sal = torch.zeros(E, n, dtype=torch.bool)
    sal.scatter_(1, idx, True)
    return sal


# ---------------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------------


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
    W64, H64, Q64 = W.double(), H.double(), Q.double()
    if side == "output":
        out = []
        for blk, (s0, s1) in zip(backbone_blocks, _split(backbone_blocks.shape[0], W.shape[1])):
            Qb, Wb = Q64[:, s0:s1], W64[:, s0:s1]
            num = (Wb @ H64 @ Qb.transpose(-1, -2)).sum(0)
            den = (Qb @ H64 @ Qb.transpose(-1, -2)).sum(0)
            den = den + ridge * den.diagonal().mean() * torch.eye(den.shape[0], dtype=den.dtype)
            out.append(_solve(den, num.t()).t())
        return torch.stack(out).to(W.dtype)
    # input side (single block)
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
    return X.unsqueeze(0).to(W.dtype)


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


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------


@dataclass
class CEJDResult:
    weight: torch.Tensor  # [E, m, n] fp32 reconstruction (exactly reconstruct(parts))
    bits: BitBudget
    parts: dict  # see module docstring
    objective: float  # final f (with the metric used)
    history: list


def reconstruct(parts: dict) -> torch.Tensor:
    """``W_hat [E, m, n]`` from the stored representation (the documented formula)::

        Q_e = row_scale[e][:, None] * (sign[e] * col_scale[e][None, :] + sign2[e] * col_scale2[e][None, :])
        W_hat[e] = backbone @ Q_e  (side "output"),  Q_e @ backbone  (side "input"),  Q_e  (side "none")

    ``sign2``/``col_scale2`` (second plane, salient factor columns; zero elsewhere) are optional;
    ``backbone`` = block_diag(blocks) with blocks dequantized from their stored dtype
    (int8: ``blocks * scale[..., None]``).
    """
    C = parts["sign"].float() * parts["col_scale"].float()[..., None, :]
    if parts.get("sign_x") is not None:  # further full planes, in order
        for p in range(parts["sign_x"].shape[-3]):
            C = C + parts["sign_x"].select(-3, p).float() * parts["col_scale_x"].select(-2, p).float()[..., None, :]
    if parts.get("sign2") is not None:
        C = C + parts["sign2"].float() * parts["col_scale2"].float()[..., None, :]
    Q = parts["row_scale"].float()[..., :, None] * C
    bb = parts.get("backbone")
    if bb is None or parts["side"] == "none":
        return Q
    M = backbone_matrix(bb)
    return M @ Q if parts["side"] == "output" else Q @ M


def backbone_matrix(bb: dict) -> torch.Tensor:
    """Dequantized full backbone (block diagonal) from its stored form."""
    blocks = bb["blocks"]
    if bb["dtype"] == "int8":
        blocks = blocks.float() * bb["scale"].float()[:, :, None]
    return _blockdiag(blocks.float())


def choose_side(m: int, n: int) -> str:
    return "input" if n <= m else "output"


def cejd_quantize(W, H, *, side: str | None = None, blocks: int = 1, backbone_dtype: str = "bfloat16",
                  G=None, rounds: int = 3, scale_rounds: int = 3, percdamp: float = 0.01,
                  cg_iters: int = 60, weights=None, salient_cols: int = 0, refine: int = 0,
                  polish: int = 0, hdamp: float = 0.0, planes: int = 1) -> CEJDResult:
    """Joint decomposition + binarization of one projection ``W [E, m, n]`` with Hessians ``H [E, n, n]``.

    side: "input" | "output" | None (auto: the cheaper side) | "none" (no backbone: the binary factor
        is fit on each ``W_e`` directly; the CEJD-off ablation).
    weights ``[E]``: per-expert weight of the joint objective (e.g. routed tokens); H is scaled by it
        (per-expert problems are scale free, the backbone refit is not).
    G ``[m, m]``: output metric (NGES); None = identity.
    rounds: binarize ↔ backbone-refit alternations.
    salient_cols: per expert, factor columns with a further binary plane (largest output-error energy).
    planes: full binary planes of the factor (1 = one sign per weight); the salient plane comes on top.
        Planes are fit jointly: signs plane by plane on each column's residual, then the scales of all
        planes on the one objective (the planes as column blocks of one wider factor, :func:`_stacked`);
        sign descent flips the first plane only, as with the salient plane.
    refine: rounds of greedy sign coordinate descent (+ scale refit) after the GPTQ sign pass of the
        last alternation only: refining earlier anchors the backbone refit to those signs and lands in a
        worse optimum (captured mixtral-8e gate_up layers: layer objective +19% on average).
    polish: refinement rounds against the final stored backbone (after its rounding and refit), which
        the factor has not seen yet (captured layers: -2% objective on qwen3moe-32e, -5% on mixtral-8e).
    hdamp: ridge added to every Hessian for all fits, ``H_e + hdamp·mean(diag H_e)·I`` (regularizes
        towards plain weight error; limits over-fitting the calibration tokens).
    """
    W = W.float()
    H = _sym(H.float())
    if hdamp > 0:
        md = H.diagonal(dim1=-2, dim2=-1).mean(-1)
        H = H + hdamp * md[:, None, None] * torch.eye(H.shape[-1], dtype=H.dtype)
    if weights is not None:
        H = H * (weights.float() / weights.float().mean().clamp_min(1e-30)).to(H.device)[:, None, None]
    E, m, n = W.shape
    if not isinstance(planes, int) or planes < 1:
        raise ValueError(f"cejd_quantize: planes must be an int >= 1, got {planes!r}")
    P = planes - 1
    side = side or choose_side(m, n)
    if side != "output":
        blocks = 1
    if side == "none":
        bb = torch.eye(n, dtype=W.dtype).unsqueeze(0)
        rounds = 1
    else:
        bb = init_backbone(W, H, "input" if side == "input" else "output", blocks)
    fside = "input" if side == "none" else side
    history = []
    B = a = b = B2 = b2 = sal = sal0 = None
    # sign descent flips the first plane only: on further planes it over-fits the calibration tokens
    # (heldout-mixtral-9m seed 2: gap 0.0178 refining every plane, 0.0106 the first only)
    rcols = n if P else None
    collapse = (lambda Q: Q) if P == 0 else (lambda Q: Q.view(E, m, P + 1, n).sum(2))  # noqa: E731
    for r in range(rounds):
        full = _blockdiag(bb)
        fm0 = factor_metrics(W, H, full, fside, G)
        fm = _stacked(fm0, P)
        prev = None if B is None else (B, a, b, B2, b2)
        if B is None:
            a, b = _init_scales(fm0.A)
            sal0 = select_salient(fm0, salient_cols)
            sal = _pad_cols(sal0, P)
        B, b, B2, b2, X, xb = _gptq(fm0.A, fm0.Hf, a, None if fm0.Gf is None else fm0.Gf.diagonal(dim1=-2, dim2=-1),
                                    percdamp, sal0, extra=P)
        if P:
            B, b = torch.cat([B, *X.unbind(1)], -1), torch.cat([b, *xb.unbind(1)], -1)
            B2, b2 = _pad_cols(B2, P), _pad_cols(b2, P)
        # every closed-form step is kept per expert only if it helps: on a nearly singular Hessian (few
        # tokens) two planes on one column can cancel with scales beyond fp16
        better = lambda Q: _obj(W, collapse(Q), full, fside, H, G, True)  # noqa: E731
        f = (B, a, b, B2, b2)
        f = _keep_better(f, refit_scales(B.clone(), a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal), sal, better)
        if r == rounds - 1:  # refined signs in an earlier round anchor the backbone refit in a worse optimum
            f = _keep_better(f, _refine(f[0].clone(), *f[1:], sal, fm, refine, scale_rounds, rcols), sal, better)
        B, a, b, B2, b2 = f
        if prev is not None:  # a fresh binarization can lose to the previous factor under the new backbone
            B, a, b, B2, b2 = _keep_better(prev, (B, a, b, B2, b2), sal, better)
        Q = collapse(_factor(a, B, b, B2 if sal is not None else None, b2))
        history.append(("binarize", float(_obj(W, Q, full, fside, H, G))))
        if side == "none":
            break
        bb = refit_backbone(W, H, Q, bb, side, G, cg_iters)
        history.append(("backbone", float(_obj(W, Q, _blockdiag(bb), side, H, G))))
    backbone = None
    if side != "none":
        # store the backbone at its dtype, then refit the scales against the stored backbone
        stored, bscale, deq = quantize_backbone(bb, backbone_dtype)
        fm = _stacked(factor_metrics(W, H, _blockdiag(deq), side, G), P)
        prev = (B, a, b, B2, b2)
        new = refit_scales(B.clone(), a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal)
        new = _refine(*new, sal, fm, polish, scale_rounds, rcols)
        B, a, b, B2, b2 = _keep_better(prev, new, sal,
                                       lambda Q: _obj(W, collapse(Q), _blockdiag(deq), side, H, G, True))
        backbone = {"blocks": stored, "dtype": backbone_dtype, "scale": bscale, "side": side}
    two = sal is not None
    if P:  # back from the stacked column blocks to plane-wise tensors
        X, xb = B[..., n:].view(E, m, P, n).transpose(1, 2), b[:, n:].view(E, P, n)
        B, b, B2, b2, sal = B[..., :n], b[:, :n], B2[..., :n], b2[:, :n], sal0
    # scales are stored as log-uniform 8-bit codes (scale_codes); the parts carry the codes and the
    # decoded fp16 values, which are what reconstruct() and the packed tensor compute with
    row_code, g_row = encode_log8(a)
    col_code, g_col = encode_log8(b)
    col_code2, g_col2 = encode_log8(b2) if two else (None, torch.zeros(E, 2, dtype=torch.float16))
    parts = {"side": side, "backbone": backbone, "sign": B.to(torch.int8), "row_scale": decode_log8(row_code, g_row),
             "col_scale": decode_log8(col_code, g_col),
             "sign2": B2.to(torch.int8) if two else None,
             "col_scale2": decode_log8(col_code2, g_col2) if two else None,
             "salient": sal, "row_code": row_code, "col_code": col_code, "col_code2": col_code2}
    grids = [g_row, g_col, g_col2]
    if P:
        col_code_x, g_x = encode_log8(xb)
        parts.update(sign_x=X.to(torch.int8), col_code_x=col_code_x, col_scale_x=decode_log8(col_code_x, g_x))
        grids += list(g_x.unbind(1))
    parts["scale_grid"] = torch.stack(grids, 1)
    What = reconstruct(parts)
    history.append(("stored", float(layer_objective(W, What, H, G))))
    n_sal = int(sal.sum()) if two else 0
    bits = BitBudget(n_weights=E * m * n, sign_bits=E * m * n * planes + m * n_sal, bitmap_bits=E * n if two else 0,
                     param_bits=CODE_BITS * (E * (m + n * planes) + n_sal) + FP16 * (GRID_FP16_PER_EXPERT + 2 * P) * E,
                     backbone_bits=0 if backbone is None else backbone_bits(tuple(bb.shape), backbone_dtype))
    return CEJDResult(What, bits, parts, history[-1][1], history)


def _stacked(fm: FactorMetrics, P: int) -> FactorMetrics:
    """The factor problem of ``1 + P`` full planes as one factor with ``(1 + P)·n`` columns: the weight is
    the sum of the column blocks, ``Q = [Q_0 … Q_P] Sᵀ`` with ``S = [I … I]``, so the right metric becomes
    ``S Hf Sᵀ`` (``Hf`` tiled) and the cross term ``T S``; scale refits and sign descent then work on
    every plane unchanged."""
    if P == 0:
        return fm
    k = P + 1
    return FactorMetrics(fm.Gf, fm.Hf.repeat(1, k, k), fm.T.repeat(1, 1, k), fm.A.repeat(1, 1, k))


def _pad_cols(t, P: int):
    """``t [..., n]`` followed by ``P·n`` zero (or False) columns: the salient plane lives on block 0."""
    if t is None or P == 0:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-1], P * t.shape[-1])], -1)


def _refine(B, a, b, B2, b2, sal, fm, times: int, scale_rounds: int, cols: int | None = None):
    """``times`` rounds of greedy sign descent (two sweeps, on the first ``cols`` columns) each followed by a
    closed-form scale refit."""
    for _ in range(times):
        B = refine_signs(B, a, b, fm, 2, B2 if sal is not None else None, b2, cols=cols)
        B, a, b, B2, b2 = refit_scales(B, a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal)
    return B, a, b, B2, b2


def _obj(W, Q, full, side, H, G, per_expert=False):
    What = full @ Q if side == "output" else Q @ full
    return layer_objective(W, What, H, G, per_expert)


def _keep_better(old, new, sal, objective):
    """Per expert, the factor (signs and scales) with the lower layer objective, measured with the scales
    rounded to their stored fp16 (an fp16 overflow counts as infinitely bad), so no step of the
    alternation makes an expert worse: on experts with almost no calibration tokens the closed-form
    refits are ill-conditioned and a fresh binarization can diverge."""
    def score(f):
        B, a, b, B2, b2 = f
        Q = _factor(a.half().float(), B, b.half().float(), B2 if sal is not None else None,
                    None if b2 is None else b2.half().float())
        v = objective(Q)
        return torch.where(torch.isfinite(v), v, torch.full_like(v, float("inf")))

    take = score(new) <= score(old)  # [E]
    out = []
    for o, n in zip(old, new):
        if o is None or n is None:
            out.append(n)
        else:
            out.append(torch.where(take.view(-1, *([1] * (n.dim() - 1))), n, o))
    return tuple(out)

