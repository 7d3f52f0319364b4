"""BiLLM (Huang et al., ICML 2024): structured salient columns + bell-shaped split, per 128-column block.

Per block, BiLLM scores weights with the Hessian saliency T = W^2 / diag(Hinv)^2, picks the salient
columns and the split of the other weights by binarizing *T itself* (a quirk of the published code,
kept here), then binarizes the weights W with orders (1, 1, 2) for (non-salient |T| < p, non-salient
|T| >= p, salient columns), and compensates later blocks (``compensation.quantize_blockwise``).

The candidate searches are vectorised: the salient-column search evaluates every count at once, the
split search uses exact closed forms on row-sorted values (a group ``|x| < p`` is an interval of the
sorted row), so a [448, 192] matrix takes about 0.1-0.15 s on one CPU thread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .binarize import FP16_BITS, _sign, residual_binarize
from .compensation import quantize_blockwise
from .result import BinarizedWeight, BitBudget

N_SPLIT_CANDIDATES = 81  # quantiles 0.10, 0.11, ..., 0.90


def saliency(W: torch.Tensor, hinv_diag: torch.Tensor, metric: str = "hessian") -> torch.Tensor:
    """BiLLM's saliency matrix: W^2 / diag(Hinv)^2 ("hessian", OBS-style) or W ("magnitude")."""
    if metric == "hessian":
        return W.pow(2) / hinv_diag.pow(2)
    if metric == "magnitude":
        return W
    raise ValueError(f"unknown salient metric {metric!r}")


def _column_split_errors(X: torch.Tensor, inside: torch.Tensor, order: int) -> torch.Tensor:
    """Squared error of residual-binarizing (``order`` planes, row-wise) the columns ``inside[k]``
    and the other columns as two groups, for every candidate k at once. X [R, C], inside [K, C].

    Uses that each plane removes n*(mu^2 + alpha^2) from the group's sum of squares.
    """
    g = torch.stack([inside, ~inside], 2).to(X.dtype)  # [K, C, 2]
    n = g.sum(1, keepdim=True)  # [K, 1, 2]

    def spread(s):  # per-(candidate, row, group) statistic -> [K, R, C]
        return torch.where(inside[:, None, :], s[..., :1], s[..., 1:])

    E, removed = X, 0
    for o in range(order):
        mu = (E @ g) / n.clamp_min(1)
        D = E - spread(mu)
        alpha = (D.abs() @ g) / n.clamp_min(1)
        removed = removed + n * (mu**2 + alpha**2)
        if o < order - 1:
            E = D - spread(alpha) * _sign(D)
    return ((X * X) @ g - removed).sum((1, 2))


def column_scores(T: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Column ranking score of the structural search: sum_i |T_ij| ("l1", BiLLM) or ||T_:j||_2 ("l2", HBLLM)."""
    if metric == "l1":
        return T.abs().sum(-2)
    if metric == "l2":
        return torch.linalg.vector_norm(T, dim=-2)
    raise ValueError(f"unknown column metric {metric!r}; expected 'l1' or 'l2'")


def search_salient_columns(T: torch.Tensor, up_lim: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """BiLLM's structural search: the salient columns of one block.

    Columns are ranked by sum_i |T_ij| (``column_scores``, "l1"); for k = 1 .. up_lim-1 (at most
    ncols-1) the top-k columns and the rest are each binarized with 2 residual planes and scored by
    the squared error on T; the first k with the smallest error wins. Returns (salient column indices,
    errors for k = 1, 2, ...).
    """
    ranked = torch.sort(column_scores(T), descending=True, stable=True).indices
    ks = torch.arange(1, min(up_lim, T.shape[1]), device=T.device)
    if len(ks) == 0:
        return ranked[:0], T.new_zeros(0)
    inside = torch.arange(T.shape[1], device=T.device) < ks[:, None]
    errors = _column_split_errors(T[:, ranked], inside, order=2)
    return ranked[: int(ks[torch.argmin(errors)])], errors


def split_candidates(values: torch.Tensor) -> torch.Tensor:
    """The 81 split candidates: quantiles 0.10, 0.11, ..., 0.90 (linear interpolation) of ``values``."""
    q = torch.linspace(0.10, 0.90, N_SPLIT_CANDIDATES, dtype=torch.float64, device=values.device)
    return torch.quantile(values.flatten().double(), q).to(values.dtype)


def _range_sum(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return P.gather(1, b) - P.gather(1, a)


def _interval_residual(v, P1, P2, pieces, order):
    """Residual binarization of groups given as unions of sorted pieces, in closed form.

    ``v`` [R, m] holds each row's values sorted (float64), P1/P2 [R, m+1] the prefix sums of v and
    v^2; a group is the union over ``pieces`` (a, b, shift) of v[r, a:b] + shift (index/shift
    tensors [R, J], one column per candidate). A plane splits every piece at the group mean into a
    lower and an upper piece, each still sorted, so means and mean absolute deviations are sums
    over prefix ranges, and each plane removes n*(mu^2 + alpha^2) from the sum of squares.
    Returns (error [R, J], [(mu, alpha) per plane]).
    """
    n = sum(b - a for a, b, _ in pieces)
    sq = sum(_range_sum(P2, a, b) for a, b, _ in pieces)
    stats = []
    for o in range(order):
        mu = sum(_range_sum(P1, a, b) + s * (b - a) for a, b, s in pieces) / n.clamp_min(1)
        absdev, cuts = 0, []
        for a, b, s in pieces:
            c = mu - s
            m = torch.minimum(torch.maximum(torch.searchsorted(v, c), a), b)
            absdev = absdev + c * (m - a) - _range_sum(P1, a, m) + _range_sum(P1, m, b) - c * (b - m)
            cuts.append(m)
        alpha = absdev / n.clamp_min(1)
        stats.append((mu, alpha))
        if o < order - 1:
            pieces = [p for (a, b, s), m in zip(pieces, cuts) for p in ((a, m, s - mu + alpha), (m, b, s - mu - alpha))]
    return sq - n * sum(mu**2 + alpha**2 for mu, alpha in stats), stats


def search_split_threshold(
    T: torch.Tensor,
    cols: torch.Tensor,
    candidates: torch.Tensor,
    *,
    order: int = 1,
    S: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BiLLM's split search over the entries of ``T[:, cols]``: groups |T| < p and |T| >= p.

    Each group is binarized row-wise with ``order`` residual planes, for every candidate p. Without
    ``S`` the score is the squared error on T (the rest of the block adds a constant); with ``S``
    (ARB-X) it is the output error sum_r e_r S e_r^T of the whole block, the other columns being
    reconstructed by ``fixed`` (zero where not given). Returns (best p, errors per candidate); ties go
    to the first candidate.
    """
    v = T[:, cols].double().sort(1).values
    P1, P2 = F.pad(v.cumsum(1), (1, 0)), F.pad(v.pow(2).cumsum(1), (1, 0))
    p = candidates.double().expand(v.shape[0], -1).contiguous()  # [R, J]
    hi = torch.searchsorted(v, p)  # entries x < p
    lo = torch.minimum(torch.searchsorted(v, -p, right=True), hi)  # entries x <= -p
    zero, end, none = torch.zeros_like(hi), torch.full_like(hi, v.shape[1]), torch.zeros_like(p)
    err_in, stats_in = _interval_residual(v, P1, P2, [(lo, hi, none)], order)
    err_out, stats_out = _interval_residual(v, P1, P2, [(zero, lo, none), (hi, end, none)], order)
    if S is None:
        errors = (err_in + err_out).sum(0)
    else:
        errors = _output_errors(T, cols, candidates, stats_in, stats_out, S, fixed)
    return candidates[torch.argmin(errors)], errors


def _output_errors(T, cols, candidates, stats_in, stats_out, S, fixed):
    """sum_r e_r S e_r^T per candidate, rebuilding each candidate's reconstruction of T[:, cols].

    With e = f + e_c (f: the fixed error off ``cols``, e_c: the candidate's error on ``cols``) the
    score is f S f^T + 2 e_c S_cf f^T + e_c S_cc e_c^T, so only the searched columns are rebuilt.
    """
    S = S.to(T.dtype)
    X = T[:, cols]
    f = T if fixed is None else T - fixed
    f = f.index_fill(1, cols, 0)
    fS = f @ S
    inside = X.abs() < candidates[:, None, None]  # [J, R, m]
    E = X
    for (mu_in, a_in), (mu_out, a_out) in zip(stats_in, stats_out):
        mu = torch.where(inside, mu_in.T[..., None].to(X.dtype), mu_out.T[..., None].to(X.dtype))
        a = torch.where(inside, a_in.T[..., None].to(X.dtype), a_out.T[..., None].to(X.dtype))
        D = E - mu
        E = D - a * _sign(D)
    quad = ((E @ S[cols][:, cols]) * E).sum((1, 2))
    return (fS * f).sum() + 2 * (E * fS[:, cols]).sum((1, 2)) + quad


def column_mask(cols: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean [R, C] mask of whole columns ``cols``."""
    m = torch.zeros(like.shape[1], dtype=torch.bool, device=like.device)
    m[cols] = True
    return m.expand_as(like)


def split_nonsalient(T, salient, S=None, fixed=None):
    """BiLLM's bell-shaped split of the non-salient weights: (|T| < p, |T| >= p) masks.

    Candidates are quantiles of |T| over the whole block with salient entries zeroed, as the
    published code computes them (the zeros shift the quantiles when many columns are salient).
    """
    cols = (~salient[0]).nonzero().squeeze(1)
    p, _ = search_split_threshold(T, cols, split_candidates((T * ~salient).abs()), S=S, fixed=fixed)
    return (T.abs() < p) & ~salient, (T.abs() >= p) & ~salient


def partition_budget(groups: list[tuple[torch.Tensor, int]], n_params: int, split_weights: int) -> BitBudget:
    """Bits of one block partitioned into groups (mask, order).

    sign_bits: order bits per weight of each group. bitmap_bits: the salient-column bitmap, 1 bit per
    column of the block (what the papers count besides the planes). group_bitmap_bits:
    ``split_weights`` (1 bit per weight whose group is chosen weight by weight). param_bits: 16 per
    fp16 statistic.
    """
    rows, cols = groups[0][0].shape
    return BitBudget(
        n_weights=rows * cols,
        sign_bits=sum(order * int(mask.sum()) for mask, order in groups),
        bitmap_bits=cols,
        group_bitmap_bits=split_weights,
        param_bits=FP16_BITS * n_params,
    )


def billm_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    salient_metric: str = "hessian",
    salient_up_lim: int = 50,
    compensate: bool = True,
    name: str = "weight",
) -> BinarizedWeight:
    """BiLLM on one matrix W [out, in] with Hessian H [in, in] (H = 2/n sum x x^T).

    Bits (per block of ``blocksize`` columns, k salient columns, R rows): sign_bits = R*C + R*k;
    bitmap_bits = C (salient-column bitmap); group_bitmap_bits = R*(C-k) (non-salient split);
    param_bits = 16 * (3 per row for the salient group [2 scales + summed mean] + 2 per row for each
    non-salient group). So paper_bits = 1 + k/C + 1/R, and all_inclusive_bits adds (C-k)/C + 7*16/C
    (about 1.8 at C = 128).
    """

    def block(Wb, hinv_diag, Hb):
        T = saliency(Wb, hinv_diag, salient_metric)
        cols, _ = search_salient_columns(T, salient_up_lim)
        salient = column_mask(cols, T)
        small, large = split_nonsalient(T, salient)
        groups = [(small, 1), (large, 1), (salient, 2)]
        parts = [residual_binarize(Wb, mask, order) for mask, order in groups]
        n_split = Wb.shape[0] * (Wb.shape[1] - len(cols))
        return sum(b.q for b in parts), partition_budget(groups, sum(b.n_params for b in parts), n_split)

    Q, bits = quantize_blockwise(W, H, block, blocksize=blocksize, percdamp=percdamp, compensate=compensate, name=name)
    return BinarizedWeight(Q, bits)
