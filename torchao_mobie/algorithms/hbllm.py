"""HBLLM (Chen, Ye, Jiang, NeurIPS 2025): BiLLM's block pipeline with Haar wavelet bands.

Per block of ``blocksize`` input columns (weights already compensated for the earlier blocks):

1. **Salient columns.** Saliency T = W^2 / diag(Hinv)^2 (as BiLLM); columns are ranked by the l2
   norm of T's columns and BiLLM's structural search (binarize T itself, top-k columns vs the rest,
   two residual planes each) picks k.
2. **Fill.** Each salient column is replaced by the mean of the non-salient columns within +-3
   columns (else the nearest non-salient column, left first), so the Haar pairs stay smooth.
3. **Haar bands.** The filled block is Haar-transformed along each row (pairs of columns): the low
   band is binarized, then the high band (of what the low band leaves, which for an orthonormal Haar
   is the high band itself). Each band is binarized with the *double split*: a magnitude threshold
   splits each row's coefficients into |c| < t and |c| >= t, each group stores a mean and an RMS
   scale (c ~ mu_g + s_g * sign(c - mu_g)), and t is the best of 41 quantiles (0.10..0.90) of the
   row's |c| ("row" partition) or of 81 quantiles of the whole band with one t ("global").
4. **Salient residual.** What the band reconstruction misses on the salient columns is Haar-
   transformed along the columns (pairs of rows) and binarized the same way (double split per row
   of each band, over the salient columns only).
5. **Compensation.** The block's error is pushed onto later blocks with the inverse Hessian (GPTQ /
   BiLLM, no propagation inside the block): ``compensation.quantize_blockwise``.

The ``col`` variant (published ``col-hbraq``) skips the fill: the non-salient columns themselves are
transformed along the columns, and the salient residual is the salient columns' own weights.

Differences from the published code, all below fp32 rounding or on measure-zero ties: the Haar
inverse uses 1/sqrt(2) (the published inverse uses 0.70703125, a 1e-4 scale error); signs are in
{-1, +1} (0 -> +1) so every coefficient is storable in one bit; the structural search is capped at
ncols-1 candidates (the published one needs >= 50 columns per block).

Bits, per block of R rows, C columns, k salient columns (row variant). A decoder needs, per Haar
coefficient, its sign and its group (which of the two split groups: the threshold alone cannot
tell without |c|), and per (band, row, group) a mean and a scale:

* sign_bits = R*C (both row bands: 2 x R x C/2) + R*k (both column bands of the salient residual);
* bitmap_bits = C (the salient-column mask);
* group_bitmap_bits = R*C + R*k (one split-group bit per coefficient);
* param_bits = 16 x 2 per non-empty (band, row, group): at most 2 bands x R x 2 groups for the
  row bands and 2 bands x R/2 x 2 groups for the salient ones, i.e. 12*R fp16 values.

So ``paper_bits`` (signs + bitmaps, the HBLLM/BiLLM papers' convention) = 1 + k/C + 1/R and
``all_inclusive_bits`` = 2 + 2k/C + 1/R + 192/C, about 3.6-3.7 at C = 128 (the col variant:
sign and group bits R*C each, 8*R fp16 values, so 3 + 1/R at C = 128).
"""

from __future__ import annotations

import math

import torch

from .billm import _column_split_errors, column_scores, saliency
from .binarize import FP16_BITS, _sign
from .compensation import quantize_blockwise
from .result import BinarizedWeight, BitBudget

HAAR = 1 / math.sqrt(2)
ROW_CANDIDATES = 41  # quantiles 0.10, 0.12, ..., 0.90 of each row's |c| ("row" partition)
GLOBAL_CANDIDATES = 81  # quantiles 0.10, 0.11, ..., 0.90 of the whole band's |c| ("global")
FILL_WINDOW = 7  # columns around a salient column whose non-salient neighbours fill it
SEARCH_ELEMENTS = 1 << 24  # experts per chunk of the structural search: [e, k, rows, cols] stays below this


def haar_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal one-level Haar transform along the last dim: (low, high), each [..., C/2]."""
    if X.shape[-1] % 2:
        raise ValueError(f"HBLLM's row Haar transform needs an even number of columns per block, got {X.shape[-1]}")
    even, odd = X[..., 0::2], X[..., 1::2]
    return (even + odd) * HAAR, (even - odd) * HAAR


def inverse_haar_rows(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_rows` (columns interleaved back: even = (l+h)/sqrt2, odd = (l-h)/sqrt2)."""
    return torch.stack((low + high, low - high), -1).flatten(-2) * HAAR


def haar_cols(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Haar transform along the rows' axis (pairs of rows): (low, high), each [..., R/2, C]."""
    if X.shape[-2] % 2:
        raise ValueError(f"HBLLM's column Haar transform needs an even number of rows, got {X.shape[-2]}")
    low, high = haar_rows(X.transpose(-1, -2))
    return low.transpose(-1, -2), high.transpose(-1, -2)


def inverse_haar_cols(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return inverse_haar_rows(low.transpose(-1, -2), high.transpose(-1, -2)).transpose(-1, -2)


def _rms_groups(X: torch.Tensor, groups: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each group (bool mask) binarized row-wise as mu + s*sign(x - mu), s the RMS deviation.

    Returns the reconstruction (zero outside the groups) and the fp16 values stored: a mean and a
    scale per (row, group) that holds an entry.
    """
    Q, n_params = torch.zeros_like(X), 0
    for G in groups:
        M = G.to(X.dtype)
        n = M.sum(-1, keepdim=True)
        mu = (X * M).sum(-1, keepdim=True) / n.clamp_min(1)
        D = (X - mu) * M
        s = (D.pow(2).sum(-1, keepdim=True) / n.clamp_min(1)).sqrt()
        Q = Q + (mu + s * _sign(D)) * M
        n_params += 2 * int((n > 0).sum())
    return Q, n_params


def split_candidates(A: torch.Tensor, valid: torch.Tensor, partition: str) -> torch.Tensor:
    """Thresholds to try on |c| (``A``): quantiles of the valid entries per row ([J, ..., R, 1]) for
    "row", or of the whole band ([J, ..., 1, 1]) for "global" (linear interpolation, as numpy)."""
    masked = A.masked_fill(~valid, float("nan"))
    if partition == "row":
        q = torch.linspace(0.10, 0.90, ROW_CANDIDATES, dtype=A.dtype, device=A.device)
        return torch.nanquantile(masked, q, dim=-1, keepdim=True)
    if partition == "global":
        q = torch.linspace(0.10, 0.90, GLOBAL_CANDIDATES, dtype=A.dtype, device=A.device)
        return torch.nanquantile(masked.flatten(-2), q, dim=-1)[..., None, None]
    raise ValueError(f"unknown group_partition {partition!r}; expected 'row' or 'global'")


def double_split(X: torch.Tensor, valid: torch.Tensor, partition: str = "row") -> tuple[torch.Tensor, int]:
    """HBLLM's double optimal split of a band ``X`` [..., R, C] over its ``valid`` entries.

    For every candidate threshold t the groups |x| < t and |x| >= t are binarized with
    :func:`_rms_groups`; each row ("row") or the whole band ("global") keeps the t with the smallest
    squared error, the first on ties. Returns (reconstruction, zero off ``valid``; fp16 values stored).
    """
    valid = valid.expand_as(X)
    A = X.abs()
    cands = split_candidates(A, valid, partition)
    errors = []
    for t in cands:
        Q, _ = _rms_groups(X, [valid & (A < t), valid & (A >= t)])
        err = ((X - Q) * valid).pow(2).sum(-1, keepdim=True)
        errors.append(err if partition == "row" else err.sum(-2, keepdim=True))
    best = torch.stack(errors).argmin(0, keepdim=True)  # [1, ..., R or 1, 1]
    t = cands.expand(-1, *best.shape[1:]).gather(0, best)[0]
    return _rms_groups(X, [valid & (A < t), valid & (A >= t)])


def search_salient(T: torch.Tensor, up_lim: int = 50, metric: str = "l2") -> torch.Tensor:
    """BiLLM's structural search on every matrix of ``T`` [E, R, C] at once: salient column mask [E, C].

    Columns ranked by ``column_scores``; for k = 1 .. min(up_lim, C) - 1 the top-k columns and the
    rest are each binarized with two residual planes and scored on T itself; the first best k wins.
    """
    E, R, C = T.shape
    ranked = torch.sort(column_scores(T, metric), dim=-1, descending=True, stable=True).indices  # [E, C]
    ks = torch.arange(1, min(up_lim, C), device=T.device)
    if len(ks) == 0:
        return torch.zeros(E, C, dtype=torch.bool, device=T.device)
    inside = torch.arange(C, device=T.device) < ks[:, None]  # [K, C]: the top-k of the ranked columns
    Tr = T.gather(-1, ranked[:, None, :].expand(E, R, C))
    chunk = max(1, SEARCH_ELEMENTS // (len(ks) * R * C))
    errors = torch.cat([torch.vmap(_column_split_errors, in_dims=(0, None, None))(Tr[i:i + chunk], inside, 2)
                        for i in range(0, E, chunk)])  # [E, K]
    k = ks[errors.argmin(-1)]  # [E]
    rank_of = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(C, device=T.device).expand(E, C))
    return rank_of < k[:, None]


def fill_salient_columns(W: torch.Tensor, salient: torch.Tensor, window: int = FILL_WINDOW) -> torch.Tensor:
    """Salient columns of ``W`` [E, R, C] replaced by the mean of the non-salient columns within
    ``window // 2`` columns; where there are none, by the nearest non-salient column on the left
    (the first column: on the right)."""
    E, R, C = W.shape
    pos = torch.arange(C, device=W.device)
    plain = ~salient  # [E, C]
    near = ((pos[:, None] - pos[None, :]).abs() <= window // 2).to(W.dtype)  # [j, c]
    A = plain[:, :, None].to(W.dtype) * near  # A[e, j, c]: plain column j averaged into column c
    count = A.sum(1, keepdim=True)
    left = torch.where(plain, pos, -1).cummax(-1).values  # last plain column at or before c
    right = torch.where(plain, pos, C).flip(-1).cummin(-1).values.flip(-1)  # first plain column at or after c
    fallback = torch.where((pos > 0) & (left >= 0), left, right).clamp_max(C - 1)
    nearest = torch.nn.functional.one_hot(fallback, C).to(W.dtype).transpose(1, 2)  # [e, j, c]
    A = torch.where(count > 0, A / count.clamp_min(1), nearest)
    return torch.where(salient[:, None, :], W @ A, W)


def hbllm_block(Wb: torch.Tensor, hinv_diag: torch.Tensor, *, haar: str = "row", partition: str = "row",
                metric: str = "l2", up_lim: int = 50) -> tuple[torch.Tensor, BitBudget]:
    """One block ``Wb`` [E, R, C] of every expert: (reconstruction, bit budget summed over experts)."""
    E, R, C = Wb.shape
    salient = search_salient(saliency(Wb, hinv_diag.unsqueeze(-2)), up_lim, metric)  # [E, C]
    scol = salient[:, None, :]
    if haar == "row":
        low, high = haar_rows(fill_salient_columns(Wb, salient))
        everything = torch.ones_like(low, dtype=torch.bool)
        (Ql, pl), (Qh, ph) = double_split(low, everything, partition), double_split(high, everything, partition)
        base = inverse_haar_rows(Ql, Qh)
        n_base = E * R * C
    elif haar == "col":
        plain = ~scol
        low, high = haar_cols(Wb * plain)
        (Ql, pl), (Qh, ph) = double_split(low, plain, partition), double_split(high, plain, partition)
        base = inverse_haar_cols(Ql, Qh) * plain
        n_base = R * int(plain.sum())
    else:
        raise ValueError(f"unknown Haar direction {haar!r}; expected 'row' or 'col'")
    slow, shigh = haar_cols((Wb - base) * scol)
    (Sl, sl), (Sh, sh) = double_split(slow, scol, partition), double_split(shigh, scol, partition)
    Q = base + inverse_haar_cols(Sl, Sh) * scol
    n_salient = R * int(salient.sum())
    n_coef = n_base + n_salient
    bits = BitBudget(n_weights=E * R * C, sign_bits=n_coef, bitmap_bits=E * C, group_bitmap_bits=n_coef,
                     param_bits=FP16_BITS * (pl + ph + sl + sh))
    return Q, bits


def hbllm_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    haar: str = "row",
    group_partition: str = "row",
    salient_metric: str = "l2",
    salient_up_lim: int = 50,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    name: str = "weight",
) -> BinarizedWeight:
    """HBLLM on ``W`` [out, in] or a stack of experts ``[E, out, in]`` with Hessians ``H`` ([E,] in, in),
    H = 2/n sum x x^T. Defaults are the published README's setting (row-hbraq, l2, row partition)."""
    if haar not in ("row", "col"):
        raise ValueError(f"{name}: HBLLM haar must be 'row' or 'col', got {haar!r}")
    if group_partition not in ("row", "global"):
        raise ValueError(f"{name}: HBLLM group_partition must be 'row' or 'global', got {group_partition!r}")
    single = W.dim() == 2
    if single:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    if W.shape[-2] % 2:
        raise ValueError(f"{name}: HBLLM needs an even number of output rows (pairs of rows are Haar-"
                         f"transformed), got {W.shape[-2]}")

    def block(Wb, d, _Hb):
        return hbllm_block(Wb, d, haar=haar, partition=group_partition, metric=salient_metric, up_lim=salient_up_lim)

    Q, bits = quantize_blockwise(W, H, block, blocksize=blocksize, percdamp=percdamp, compensate=compensate, name=name)
    return BinarizedWeight(Q[0] if single else Q, bits)
