"""HBLLM pinned on hand-computed cases: Haar bands, the double split, salient columns, fill, bits."""

import math

import pytest
import torch

from torchao_mobie.algorithms import hbllm_quantize, residual_binarize
from torchao_mobie.algorithms.billm import saliency
from torchao_mobie.algorithms.hbllm import (
    double_split,
    fill_salient_columns,
    haar_cols,
    haar_rows,
    hbllm_block,
    inverse_haar_cols,
    inverse_haar_rows,
    search_salient,
    split_candidates,
)

R2 = math.sqrt(2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n_in, n_tokens, seed):
    g = _gen(seed)
    X = torch.randn(n_in, 6, generator=g) @ torch.randn(6, n_tokens, generator=g) + 0.3 * torch.randn(n_in, n_tokens, generator=g)
    return X * torch.linspace(0.3, 2.0, n_in)[:, None]


def test_haar_bands_hand_computed_and_exactly_invertible():
    X = torch.tensor([[1.0, 3, 2, 2], [4, 0, -1, 1]], dtype=torch.float64)
    low, high = haar_rows(X)
    assert torch.allclose(low, torch.tensor([[4, 4], [4, 0]], dtype=torch.float64) / R2, atol=0, rtol=1e-15)
    assert torch.allclose(high, torch.tensor([[-2, 0], [4, -2]], dtype=torch.float64) / R2, atol=0, rtol=1e-15)
    clow, chigh = haar_cols(X)  # pairs of rows
    assert torch.allclose(clow, torch.tensor([[5, 3, 1, 3]], dtype=torch.float64) / R2, rtol=1e-15)
    assert torch.allclose(chigh, torch.tensor([[-3, 3, 3, 1]], dtype=torch.float64) / R2, rtol=1e-15)
    Y = torch.randn(3, 6, 10, generator=_gen(0), dtype=torch.float64)
    assert torch.allclose(inverse_haar_rows(*haar_rows(Y)), Y, atol=1e-14, rtol=0)
    assert torch.allclose(inverse_haar_cols(*haar_cols(Y)), Y, atol=1e-14, rtol=0)
    # orthonormal: the energy of the two bands is the block's
    assert torch.allclose(sum(b.pow(2).sum() for b in haar_rows(Y)), Y.pow(2).sum(), rtol=1e-13)
    with pytest.raises(ValueError, match="even number of columns"):
        haar_rows(torch.zeros(2, 5))


def test_double_split_picks_the_known_optimum():
    # each row is two tight pairs: split at a threshold between them, each group is mean +- RMS exactly
    X = torch.tensor([[1.0, -1, 4, -4], [0, 2, 10, 12]])
    Q, n_params = double_split(X, torch.ones_like(X, dtype=torch.bool))
    assert torch.allclose(Q, X, atol=1e-6)
    assert n_params == 2 * 2 * 2  # mean + scale, two groups, two rows
    # a single group cannot do that: |x| >= t for the smallest candidate t = 1 keeps row 0 in one group
    one = X[:1].mean() + X[:1].std(unbiased=False) * torch.sign(X[:1] - X[:1].mean())
    assert (one - X[:1]).pow(2).sum() > 1


def _brute_force_split(x, cands):
    """Squared error of the best threshold for one row, by plain loops."""
    best = float("inf")
    for t in cands.tolist():
        err = 0.0
        for group in (x[x.abs() < t], x[x.abs() >= t]):
            if len(group):
                mu = group.mean()
                s = (group - mu).pow(2).mean().sqrt()
                err += float((group - mu - s * torch.where(group >= mu, 1.0, -1.0)).pow(2).sum())
        best = min(best, err)
    return best


def test_double_split_matches_brute_force_row_and_global():
    X = torch.randn(2, 5, 24, generator=_gen(1)) * torch.linspace(0.5, 3, 24)
    valid = torch.rand(2, 1, 24, generator=_gen(2)) > 0.3
    Q, _ = double_split(X, valid, "row")
    assert (Q[~valid.expand_as(X)] == 0).all()
    cands = split_candidates(X.abs(), valid.expand_as(X), "row")  # [41, 2, 5, 1]
    for e in range(2):
        for r in range(5):
            x = X[e, r][valid[e, 0]]
            ours = float((Q[e, r][valid[e, 0]] - x).pow(2).sum())
            assert ours == pytest.approx(_brute_force_split(x, cands[:, e, r, 0]), rel=1e-5)
            # the candidates are the 41 quantiles 0.10 .. 0.90 of the row's valid |x|
            assert torch.allclose(cands[:, e, r, 0], torch.quantile(x.abs(), torch.linspace(0.1, 0.9, 41)))
    Qg, _ = double_split(X, valid, "global")
    gc = split_candidates(X.abs(), valid.expand_as(X), "global")  # [81, 2, 1, 1]
    assert gc.shape[0] == 81
    for e in range(2):
        errs = []
        for t in gc[:, e, 0, 0]:
            errs.append(sum(_brute_force_split(X[e, r][valid[e, 0]], t[None]) for r in range(5)))
        assert float((Qg[e] - X[e]).mul(valid[e]).pow(2).sum()) == pytest.approx(min(errs), rel=1e-5)
        # one threshold for the band cannot beat one per row
        assert float((Qg[e] - X[e]).mul(valid[e]).pow(2).sum()) >= float((Q[e] - X[e]).mul(valid[e]).pow(2).sum()) - 1e-5


def test_salient_columns_follow_l2_saliency():
    # column 0: one huge saliency entry (largest l2 norm); column 1: many medium ones (largest l1 norm)
    T = torch.full((8, 12), 0.1)
    T[0, 0] = 30.0
    T[:, 1] = 6.0
    sal_l2 = search_salient(T[None], 50, "l2")[0]
    sal_l1 = search_salient(T[None], 50, "l1")[0]
    l2 = torch.linalg.vector_norm(T, dim=0)
    assert l2[0] > l2[1] and T[:, 1].sum() > T[:, 0].sum()
    k = int(sal_l2.sum())
    assert k >= 1 and bool(sal_l2[0]) and set(sal_l2.nonzero().flatten().tolist()) == set(l2.topk(k).indices.tolist())
    if int(sal_l1.sum()) == 1:  # with one column, l1 picks the other column
        assert bool(sal_l1[1]) and not bool(sal_l1[0])
    # the count is the best k of BiLLM's search (two residual planes on T for the top-k and for the rest)
    T2 = torch.rand(16, 40, generator=_gen(3)).pow(4) * 5
    sal = search_salient(T2[None], 50, "l2")[0]
    order = torch.linalg.vector_norm(T2, dim=0).argsort(descending=True)

    def err(kk):
        m = torch.zeros_like(T2, dtype=torch.bool)
        m[:, order[:kk]] = True
        q = residual_binarize(T2, m, 2).q + residual_binarize(T2, ~m, 2).q
        return float((T2 - q).pow(2).sum())

    errors = [err(kk) for kk in range(1, 40)]
    assert int(sal.sum()) == 1 + min(range(39), key=lambda i: errors[i])
    assert set(sal.nonzero().flatten().tolist()) == set(order[: int(sal.sum())].tolist())


def test_fill_uses_the_window_mean_or_the_nearest_plain_column():
    W = torch.arange(12.0).repeat(2, 1)[None] * torch.tensor([1.0, -1.0])[None, :, None]  # column j holds +-j
    sal = torch.zeros(1, 12, dtype=torch.bool)
    sal[0, :9] = True  # columns 0..8 salient, 9..11 plain
    F = fill_salient_columns(W, sal)[0, 0]
    assert F[9:].tolist() == [9, 10, 11]  # plain columns unchanged
    assert F[8].item() == pytest.approx(10.0)  # window 5..11: plain 9, 10, 11
    assert F[6].item() == pytest.approx(9.0)  # window 3..9: plain 9 only
    assert F[0].item() == 9 and F[4].item() == 9  # no plain column within +-3: the first on the right
    sal = torch.zeros(1, 12, dtype=torch.bool)
    sal[0, 4:12] = True
    F = fill_salient_columns(W, sal)[0, 0]
    assert F[11].item() == 3  # nothing within +-3: the nearest on the left
    assert F[5].item() == pytest.approx((2 + 3) / 2)


def test_compensation_lowers_the_layer_output_error_and_bits_are_as_derived():
    g = _gen(4)
    W, X = torch.randn(32, 256, generator=g) * 0.05, _inputs(256, 512, 5)
    H = 2 * X @ X.T / X.shape[1]
    out = lambda Q: float(((W - Q) @ X).pow(2).sum())
    comp = hbllm_quantize(W, H)
    plain = hbllm_quantize(W, H, compensate=False)
    assert out(comp.weight) < 0.9 * out(plain.weight)
    # bits: per block, R*C + R*k signs, C bitmap bits, as many group bits as signs, 16-bit mean+scale per group row
    b = comp.bits
    k_total = (b.sign_bits - 32 * 256) // 32
    assert b.n_weights == 32 * 256 and b.bitmap_bits == 256 and b.group_bitmap_bits == b.sign_bits
    assert b.paper_bits == pytest.approx(1 + k_total / 256 + 1 / 32)  # 1 + k/C + 1/R
    assert b.param_bits <= 16 * 12 * 32 * 2  # at most 12 fp16 values per row and block
    assert 3.0 < b.all_inclusive_bits < 4.5


def test_vectorized_over_experts_equals_one_by_one_and_variants_run():
    g = _gen(6)
    W = torch.randn(3, 16, 64, generator=g)
    H = torch.stack([2 * (x := _inputs(64, 200, s)) @ x.T / 200 for s in range(3)])
    for haar, part in (("row", "row"), ("row", "global"), ("col", "row")):
        batched = hbllm_quantize(W, H, haar=haar, group_partition=part, blocksize=32)
        singles = [hbllm_quantize(W[e], H[e], haar=haar, group_partition=part, blocksize=32) for e in range(3)]
        assert torch.allclose(batched.weight, torch.stack([s.weight for s in singles]), atol=1e-5)
        assert batched.bits.sign_bits == sum(s.bits.sign_bits for s in singles)
        assert batched.bits.param_bits == sum(s.bits.param_bits for s in singles)
    # col variant: every weight has one sign (non-salient band or salient residual): paper bits 1 + 1/R
    col = hbllm_quantize(W, H, haar="col", blocksize=32).bits
    assert col.paper_bits == pytest.approx(1 + 1 / 16)
    with pytest.raises(ValueError, match="even number of output rows"):
        hbllm_quantize(torch.randn(5, 8), torch.eye(8))


def test_salient_residual_only_touches_salient_columns():
    g = _gen(7)
    W = torch.randn(1, 8, 32, generator=g)
    d = torch.rand(1, 32, generator=g) + 0.5
    Q, _ = hbllm_block(W, d)
    sal = search_salient(saliency(W, d.unsqueeze(-2)), 50, "l2")
    filled = fill_salient_columns(W, sal)
    low, high = haar_rows(filled)
    ones = torch.ones_like(low, dtype=torch.bool)
    base = inverse_haar_rows(double_split(low, ones)[0], double_split(high, ones)[0])
    assert torch.allclose(Q[~sal[:, None, :].expand_as(Q)], base[~sal[:, None, :].expand_as(Q)], atol=1e-6)
    # on salient columns the residual plane brings the error down
    s = sal[:, None, :].expand_as(Q)
    assert (Q - W)[s].pow(2).sum() < (base - W)[s].pow(2).sum()
