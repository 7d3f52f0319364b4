"""Binarization primitives on one masked group of a weight block.

Each function binarizes the entries of ``W`` [rows, cols] selected by a boolean ``mask`` with
statistics computed over the masked entries only (row-wise, and column-wise for ARB-RC), and returns
the reconstruction (zero outside the mask) together with the exact number of fp16 statistics the
group needs in storage. Group partitions (BiLLM, ARB) are built on top of these.

Signs are taken in {-1, +1} (0 maps to +1) so that every plane is storable in one bit; the published
code uses ``torch.sign`` (0 -> 0), which differs only on exact ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .result import BinarizedWeight, BitBudget

FP16_BITS = 16


class Binarized(NamedTuple):
    """Reconstruction of one group (zero outside its mask) and its fp16 statistics count.

    ``n_params`` = per-row statistics x rows holding an entry of the group + per-column statistics x
    columns holding one (rows or columns the group does not touch store nothing).
    """

    q: torch.Tensor
    n_params: int


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """num/den where den > 0, else ``fallback``: an empty or degenerate group keeps its value."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback)


def _n_params(mask: torch.Tensor, per_row: int, per_col: int = 0) -> int:
    return per_row * int(mask.any(1).sum()) + per_col * int(mask.any(0).sum())


def _residual_planes(W: torch.Tensor, M: torch.Tensor, order: int):
    """BiLLM's residual planes (mu_o, alpha_o, B_o), each fitted to what the previous ones left."""
    n = M.sum(1, keepdim=True).clamp_min(1)
    q, planes = torch.zeros_like(W), []
    for _ in range(order):
        R = (W - q) * M
        mu = R.sum(1, keepdim=True) / n
        D = R - mu
        alpha = (D.abs() * M).sum(1, keepdim=True) / n
        B = _sign(D)
        q = q + (alpha * B + mu) * M
        planes.append((mu, alpha, B))
    return q, planes


def residual_binarize(W: torch.Tensor, mask: torch.Tensor, order: int = 1) -> Binarized:
    """BiLLM's residual binarization: ``order`` planes, each fitting the remaining residual.

    Plane o: mu = row mean of the residual R, alpha = row mean |R - mu|, R_hat = alpha*sign(R - mu) + mu.
    Stored per row: one alpha per plane and the summed mean (the plane means add up), order + 1 values.
    """
    q, _ = _residual_planes(W, mask.to(W.dtype), order)
    return Binarized(q, _n_params(mask, order + 1))


def sign_binarize(W: torch.Tensor) -> Binarized:
    """Naive per-row sign binarization (mean, mean-abs scale): the round-to-nearest floor."""
    return residual_binarize(W, torch.ones_like(W, dtype=torch.bool), 1)


def sign_quantize(W: torch.Tensor, H: torch.Tensor | None = None) -> BinarizedWeight:
    """Naive baseline on a whole matrix; ``H`` is accepted for a uniform signature and ignored.

    Bits: 1 sign bit per weight, no bitmaps, 2 fp16 statistics (mean, scale) per row.
    """
    W = W.float()
    b = sign_binarize(W)
    return BinarizedWeight(b.q, BitBudget(n_weights=W.numel(), sign_bits=W.numel(), param_bits=FP16_BITS * b.n_params))


def _check_order(order: int) -> None:
    if order not in (1, 2):
        raise ValueError(f"ARB refinement supports 1 or 2 planes, got {order}")


def _nearest_signs(Y: torch.Tensor, scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sign planes whose level sum_p s_p*B_p is nearest to Y, for one or two planes.

    Choosing the sign of the plane with the larger |s| from Y and then the other plane's sign from
    what is left is exactly the nearest of the 4 levels {+-s1 +-s2} (the midpoint between the two
    magnitudes |s1|+|s2| and ||s1|-|s2|| is max|s|), so no 4-way search is needed.
    """
    if len(scales) == 1:
        return [_sign(Y) * _sign(scales[0])]
    s1, s2 = scales
    first = s1.abs() >= s2.abs()
    big, small = torch.where(first, s1, s2), torch.where(first, s2, s1)
    b_big = _sign(Y) * _sign(big)
    b_small = _sign(Y - b_big * big) * _sign(small)
    return [torch.where(first, b_big, b_small), torch.where(first, b_small, b_big)]


def arb_binarize(
    W: torch.Tensor,
    mask: torch.Tensor,
    order: int = 1,
    iters: int = 15,
    S: torch.Tensor | None = None,
    x_iters: int = 15,
) -> Binarized:
    """ARB alternating refinement of ``W_hat = sum_p alpha_p*B_p + mu`` (row-wise alpha_p, mu).

    Starts from BiLLM's residual planes, then ``iters`` rounds of exact block-coordinate descent on
    the masked squared error: mu (fix alpha, B), each alpha_p in turn (fix the rest), then the signs
    as the nearest of the 2**order levels (for order 1 that is sign(W - mu)). Every step is an exact
    minimiser, so the error never increases. With ``S`` (the block's X^T X, ARB-X), ``x_iters`` more
    rounds update mu and alpha_p (signs fixed) to minimise the output error (W-W_hat) S (W-W_hat)^T
    row by row. Stored per row: order scales + 1 mean.
    """
    _check_order(order)
    M = mask.to(W.dtype)
    n = M.sum(1, keepdim=True).clamp_min(1)
    _, init = _residual_planes(W, M, order)
    mu = sum(m for m, _, _ in init)
    alphas, signs = [a for _, a, _ in init], [B for _, _, B in init]

    def planes(skip=None):
        return sum((alphas[p] * signs[p] for p in range(order) if p != skip), torch.zeros_like(W))

    for _ in range(iters):
        mu = ((W - planes()) * M).sum(1, keepdim=True) / n
        for p in range(order):
            alphas[p] = (signs[p] * (W - mu - planes(p)) * M).sum(1, keepdim=True) / n
        signs = _nearest_signs(W - mu, alphas)

    if S is not None:
        S = S.to(W.dtype)
        mu_den = ((M @ S) * M).sum(1, keepdim=True)
        for _ in range(x_iters):
            mu = _safe_div((((W - planes()) * M @ S) * M).sum(1, keepdim=True), mu_den, mu)
            for p in range(order):
                Bm = signs[p] * M
                num = (((W - mu - planes(p)) * M @ S) * Bm).sum(1, keepdim=True)
                alphas[p] = _safe_div(num, ((Bm @ S) * Bm).sum(1, keepdim=True), alphas[p])
    return Binarized((planes() + mu) * M, _n_params(mask, order + 1))


def arb_rc_binarize(W: torch.Tensor, mask: torch.Tensor, order: int = 1, iters: int = 15) -> Binarized:
    """ARB-RC: ``W_hat = sum_p (a_r,p a_c,p^T) * B_p`` with row and column scales and no mean.

    Init per plane on the residual R: a_r = row mean |R|, a_c = column mean |R / a_r|, B = sign(R).
    Each of ``iters`` rounds solves for a_r,p then a_c,p of every plane in turn (least squares, the
    other planes fixed), then picks the signs as the nearest of the 2**order levels {sum_p +-c_p}.
    For order 1 the sign step is a no-op (scales stay non-negative, B = sign(W)), as in the published
    code, which keeps B fixed there. Stored: order scales per row + order scales per column.
    """
    _check_order(order)
    M = mask.to(W.dtype)
    rows_a, cols_a, signs, q = [], [], [], torch.zeros_like(W)
    for _ in range(order):
        R = (W - q) * M
        ar = R.abs().sum(1, keepdim=True) / M.sum(1, keepdim=True).clamp_min(1)
        Mc = M * (ar > 0)
        ac = (_safe_div(R.abs(), ar, torch.zeros_like(R)) * Mc).sum(0, keepdim=True)
        ac = ac / Mc.sum(0, keepdim=True).clamp_min(1)
        B = _sign(R)
        q = q + ar * ac * B * M
        rows_a, cols_a, signs = rows_a + [ar], cols_a + [ac], signs + [B]

    def plane(p):
        return rows_a[p] * cols_a[p] * signs[p]

    for _ in range(iters):
        for p in range(order):
            Wt = (W - sum((plane(o) for o in range(order) if o != p), torch.zeros_like(W))) * M
            cB = cols_a[p] * signs[p] * M
            rows_a[p] = _safe_div((cB * Wt).sum(1, keepdim=True), (cB * cB).sum(1, keepdim=True), rows_a[p])
            rB = rows_a[p] * signs[p] * M
            cols_a[p] = _safe_div((rB * Wt).sum(0, keepdim=True), (rB * rB).sum(0, keepdim=True), cols_a[p])
        signs = _nearest_signs(W, [rows_a[p] * cols_a[p] for p in range(order)])
    return Binarized(sum(plane(p) for p in range(order)) * M, _n_params(mask, order, order))
