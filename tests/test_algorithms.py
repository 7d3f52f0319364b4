"""Binarization core: primitives, BiLLM and ARB-LLM faithfulness, compensation, bit accounting."""

import inspect

import pytest
import torch

from torchao_mobie.algorithms import (
    arb_binarize,
    arb_quantize,
    arb_rc_binarize,
    billm_quantize,
    inverse_hessian_factor,
    quantize_blockwise,
    residual_binarize,
    search_salient_columns,
    search_split_threshold,
    sign_quantize,
    split_candidates,
)
from torchao_mobie.algorithms.billm import column_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n_in, n_tokens, seed, rank=8, noise=0.3):
    """Inputs whose features share a few latent factors (strongly correlated across columns)."""
    g = _gen(seed)
    X = torch.randn(n_in, rank, generator=g) @ torch.randn(rank, n_tokens, generator=g)
    X = X + noise * torch.randn(n_in, n_tokens, generator=g)
    return X * torch.linspace(0.3, 2.0, n_in)[:, None]


def _hessian(X):
    return 2 * X @ X.T / X.shape[1]


def _sq(W, Q, M=None):
    E = W - Q if M is None else (W - Q) * M
    return float(E.pow(2).sum())


def _out_err(W, Q, X):
    return float(((W - Q) @ X).pow(2).sum())


# ---------------------------------------------------------------- primitives


def test_residual_binarize_hand_computed():
    W = torch.tensor(
        [[1.0, 2, 3, 4, 10, 0], [0, 0, 4, 8, 7, 5], [0, 1, 2, 3, 9, 5], [1, 2, 3, 4, 5, 6]]
    )
    M = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    # row 0: mu 2.5, alpha 1; row 1: mu 6, alpha 1.5; row 2: mu 3, alpha 2.4 (3 == mu counts as +1)
    q1 = torch.tensor(
        [[1.5, 1.5, 3.5, 3.5, 0, 0], [0, 0, 4.5, 7.5, 7.5, 4.5], [0.6, 0.6, 0.6, 5.4, 5.4, 0], [0] * 6]
    )
    # plane 2, row 2: residual (-0.6, 0.4, 1.4, -2.4, 3.6), mu 0.48, alpha 1.616
    q2 = torch.tensor(
        [[1.0, 2, 3, 4, 0, 0], [0, 0, 4, 8, 7, 5], [-0.536, -0.536, 2.696, 4.264, 7.496, 0], [0] * 6]
    )
    b1, b2 = residual_binarize(W, M, 1), residual_binarize(W, M, 2)
    torch.testing.assert_close(b1.q, q1)
    torch.testing.assert_close(b2.q, q2)
    assert (b1.n_params, b2.n_params) == (3 * 2, 3 * 3)  # 3 rows touched; (mu, alpha) / (mu, alpha1, alpha2)


def test_second_order_beats_first_on_same_mask():
    g = _gen(1)
    W, M = torch.randn(32, 64, generator=g), torch.rand(32, 64, generator=g) > 0.3
    for fn in (residual_binarize, arb_binarize, arb_rc_binarize):
        assert _sq(W, fn(W, M, 2).q, M) < 0.5 * _sq(W, fn(W, M, 1).q, M), fn.__name__


@pytest.mark.parametrize("fn", [arb_binarize, arb_rc_binarize], ids=["arb", "arb-rc"])
@pytest.mark.parametrize("order", [1, 2])
def test_arb_refinement_never_increases_error(fn, order):
    g = _gen(2)
    W = torch.randn(24, 40, generator=g) * torch.rand(24, 1, generator=g) + torch.randn(24, 1, generator=g)
    W = W * (1 + 2 * torch.rand(1, 40, generator=g))
    M = torch.rand(24, 40, generator=g) > 0.4
    errs = [_sq(W, fn(W, M, order, iters=t).q, M) for t in range(16)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.99 * errs[0]


@pytest.mark.parametrize("order", [1, 2])
def test_arb_starts_from_billm_planes(order):
    W, M = torch.randn(8, 12, generator=_gen(19)), torch.rand(8, 12, generator=_gen(20)) > 0.3
    torch.testing.assert_close(arb_binarize(W, M, order, iters=0).q, residual_binarize(W, M, order).q)


@pytest.mark.parametrize("order", [1, 2])
def test_arb_x_lowers_output_error_monotonically(order):
    g = _gen(3)
    W, M = torch.randn(24, 32, generator=g), torch.rand(24, 32, generator=g) > 0.3
    S = _hessian(_correlated_inputs(32, 256, seed=4))

    def xerr(Q):
        E = (W - Q) * M
        return float(((E @ S) * E).sum())

    errs = [xerr(arb_binarize(W, M, order, S=S, x_iters=t).q) for t in range(16)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.9 * xerr(arb_binarize(W, M, order).q)  # ARB-X beats plain ARB on X error


def test_arb_rc_uses_no_mean():
    g = _gen(5)
    W = torch.randn(16, 24, generator=g) + 3.0  # large positive offset: a mean would absorb it
    full = torch.ones_like(W, dtype=torch.bool)
    rc, arb = arb_rc_binarize(W, full, 1).q, arb_binarize(W, full, 1).q
    s_rc, s_arb = torch.linalg.svdvals(rc.abs()), torch.linalg.svdvals(arb.abs())
    assert s_rc[1] / s_rc[0] < 1e-5  # |W_hat| = a_r a_c^T exactly: rank one, no offset term
    assert s_arb[1] / s_arb[0] > 1e-2
    assert arb_rc_binarize(W, full, 1).n_params == 16 + 24  # one scale per row and per column


# ---------------------------------------------------------------- BiLLM searches


def _ref_salient_errors(T, up_lim):
    """BiLLM's loop: top-k columns by sum |T| vs the rest, both 2-plane residual, squared error on T."""
    ranked = torch.sort(T.abs().sum(0), descending=True, stable=True).indices
    errs = []
    for k in range(1, up_lim):
        m = column_mask(ranked[:k], T)
        errs.append(_sq(T, residual_binarize(T, m, 2).q + residual_binarize(T, ~m, 2).q))
    return torch.tensor(errs), ranked


def _ref_split_errors(T, cols, candidates, order):
    region = column_mask(cols, T)
    errs = []
    for p in candidates:
        small, large = (T.abs() < p) & region, (T.abs() >= p) & region
        errs.append(_sq(T, residual_binarize(T, small, order).q + residual_binarize(T, large, order).q, region))
    return torch.tensor(errs)


def test_salient_search_range_and_scores():
    T = torch.randn(16, 60, generator=_gen(6)).pow(2)
    cols, errs = search_salient_columns(T, up_lim=50)
    ref, ranked = _ref_salient_errors(T, 50)
    assert errs.shape == (49,)  # k = 1 .. up_lim - 1
    torch.testing.assert_close(errs.double(), ref.double(), rtol=1e-4, atol=1e-4)
    k = int(torch.argmin(ref)) + 1
    assert torch.equal(cols, ranked[:k])
    assert search_salient_columns(T[:, :20], up_lim=50)[1].shape == (19,)  # capped at ncols - 1


def test_salient_search_finds_outlier_columns():
    W = torch.randn(32, 128, generator=_gen(7))
    W[:, [5, 40, 77]] *= 12
    cols, _ = search_salient_columns(W.pow(2), up_lim=50)
    assert sorted(cols.tolist()) == [5, 40, 77]


def test_split_candidates_are_81_quantiles():
    c = split_candidates(torch.arange(101.0))
    assert c.shape == (81,)
    torch.testing.assert_close(c, torch.arange(10.0, 91.0))


@pytest.mark.parametrize("signed", [False, True], ids=["hessian", "magnitude"])
@pytest.mark.parametrize("order", [1, 2])
def test_split_search_matches_bruteforce(signed, order):
    W = torch.randn(20, 40, generator=_gen(8))
    W[:, 3] = 0  # exact zeros and ties
    T = W if signed else W.pow(2)
    cols = torch.arange(6, 40)
    cand = split_candidates((T * ~column_mask(torch.arange(6), T)).abs())
    p, errs = search_split_threshold(T, cols, cand, order=order)
    ref = _ref_split_errors(T, cols, cand, order)
    torch.testing.assert_close(errs.double(), ref.double(), rtol=1e-4, atol=1e-4)
    assert p == cand[int(torch.argmin(errs))]


def test_billm_matches_hand_assembled_reference():
    """H = I (no compensation): every block is BiLLM's partition of T = W^2/d^2, orders (1, 1, 2)."""
    W = torch.randn(8, 300, generator=_gen(9))
    W[:, 17] *= 6
    H = torch.eye(300)
    d2 = 1 / 1.01  # diag of chol((1.01 I)^-1)^2
    ref = torch.empty_like(W)
    for st, ed in [(0, 128), (128, 256), (256, 300)]:
        Wb = W[:, st:ed]
        T = Wb.pow(2) / d2
        errs, ranked = _ref_salient_errors(T, 50)
        sal = column_mask(ranked[: int(torch.argmin(errs)) + 1], T)
        cand = split_candidates((T * ~sal).abs())
        p = cand[int(torch.argmin(_ref_split_errors(T, (~sal[0]).nonzero().squeeze(1), cand, 1)))]
        groups = [((T < p) & ~sal, 1), ((T >= p) & ~sal, 1), (sal, 2)]
        ref[:, st:ed] = sum(residual_binarize(Wb, m, o).q for m, o in groups)
    torch.testing.assert_close(billm_quantize(W, H).weight, ref, rtol=1e-5, atol=1e-5)


def test_block_size_is_128():
    for fn in (billm_quantize, arb_quantize):
        assert inspect.signature(fn).parameters["blocksize"].default == 128
        assert inspect.signature(fn).parameters["percdamp"].default == 0.01
        assert inspect.signature(fn).parameters["salient_up_lim"].default == 50
    widths = []

    def spy(Wb, d, Hb):
        widths.append(Wb.shape[1])
        return Wb.clone(), sign_quantize(Wb).bits

    quantize_blockwise(torch.randn(4, 300), torch.eye(300), spy)
    assert widths == [128, 128, 44]


# ---------------------------------------------------------------- compensation and robustness


def test_compensation_lowers_output_error():
    W = torch.randn(32, 256, generator=_gen(10))
    X = _correlated_inputs(256, 1024, seed=11)
    H = _hessian(X)
    for quantize in (billm_quantize, lambda W, H, **kw: arb_quantize(W, H, variant="x", **kw)):
        with_comp = _out_err(W, quantize(W, H, blocksize=64).weight, X)
        without = _out_err(W, quantize(W, H, blocksize=64, compensate=False).weight, X)
        assert with_comp < 0.8 * without, (with_comp, without)


def test_deterministic():
    W = torch.randn(48, 160, generator=_gen(12))
    H = _hessian(_correlated_inputs(160, 512, seed=13))
    arb_x, arb_rc = (lambda W, H: arb_quantize(W, H, variant="x")), (lambda W, H: arb_quantize(W, H, variant="rc"))
    for fn in (billm_quantize, arb_x, arb_rc):
        a, b = fn(W, H), fn(W.clone(), H.clone())
        assert torch.equal(a.weight, b.weight)
        assert a.bits == b.bits


@pytest.mark.parametrize("method", ["billm", "arb", "x", "rc"])
def test_singular_zero_and_dead_hessian(method):
    def run(W, H):
        return billm_quantize(W, H, name="expert.0") if method == "billm" else arb_quantize(W, H, variant=method)

    W = torch.randn(16, 40, generator=_gen(14))
    assert torch.equal(run(W, torch.zeros(40, 40)).weight, torch.zeros_like(W))  # all inputs dead
    X = torch.randn(40, 3, generator=_gen(15))  # rank 3 < 40
    assert torch.isfinite(run(W, _hessian(X)).weight).all()

    X = _correlated_inputs(40, 256, seed=16)
    X[7] = 0  # dead input column: H_77 = 0
    Q = run(W, _hessian(X)).weight
    W2 = W.clone()
    W2[:, 7] = 100.0
    assert torch.isfinite(Q).all() and torch.equal(Q, run(W2, _hessian(X)).weight)


def test_hessian_errors_are_named():
    with pytest.raises(ValueError, match="expert.3.down"):
        billm_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")), name="expert.3.down")
    with pytest.raises(ValueError, match="layer.q"):
        inverse_hessian_factor(-torch.eye(8), name="layer.q")
    rank1 = torch.ones(8, 8)  # singular: percdamp 0 fails, more damping succeeds
    U = inverse_hessian_factor(rank1, percdamp=0.0)
    assert torch.isfinite(U).all() and torch.equal(U, U.triu())


# ---------------------------------------------------------------- bits and quality


def test_bit_accounting_hand_checked():
    """2 x 8, one block, up_lim 2 (so k = 1): column 0 salient, the rest splits {0.9..1.2} | {3..3.2}."""
    W = torch.tensor([10.0, 1, 1.1, 1.2, 3, 3.1, 3.2, 0.9]).repeat(2, 1)
    H = torch.eye(8)
    b = billm_quantize(W, H, salient_up_lim=2).bits
    # 16 planes bits + 1 extra per salient weight; 1 bitmap bit per column; 1 group bit per non-salient
    # weight; per row: salient (2 scales + mean) + 2 x (scale + mean) = 7 fp16
    assert (b.n_weights, b.sign_bits, b.bitmap_bits) == (16, 16 + 2, 8)
    assert (b.group_bitmap_bits, b.param_bits, b.backbone_bits) == (2 * 7, 16 * 2 * 7, 0)
    assert b.paper_bits == pytest.approx(26 / 16)
    assert b.all_inclusive_bits == pytest.approx((18 + 8 + 14 + 224) / 16)

    # CGB: both salient weights share |T|, so the salient split puts them in one group (3 + 0 fp16 per
    # row), and every weight carries a group bit.
    a = arb_quantize(W, H, salient_up_lim=2).bits
    assert (a.sign_bits, a.bitmap_bits, a.group_bitmap_bits, a.param_bits) == (18, 8, 16, 16 * 2 * (3 + 2 + 2))
    # RC: salient 2 planes x (2 rows + 1 col); large group 2 rows + 3 cols; small 2 rows + 4 cols
    r = arb_quantize(W, H, variant="rc", salient_up_lim=2).bits
    assert (r.sign_bits, r.group_bitmap_bits, r.param_bits) == (18, 16, 16 * (6 + 5 + 6))

    s = sign_quantize(W).bits
    assert (s.sign_bits, s.bitmap_bits, s.group_bitmap_bits, s.param_bits) == (16, 0, 0, 16 * 2 * 2)
    assert (s.paper_bits, s.all_inclusive_bits) == (1.0, 5.0)


def test_quality_order_on_correlated_inputs():
    W = torch.randn(64, 256, generator=_gen(17))
    X = _correlated_inputs(256, 1024, seed=18, rank=32, noise=0.5)
    H = _hessian(X)
    rel = {
        name: _out_err(W, fn(W, H).weight, X) / float((W @ X).pow(2).sum())
        for name, fn in [
            ("sign", sign_quantize),
            ("billm", billm_quantize),
            ("arb-x", lambda W, H: arb_quantize(W, H, variant="x")),
            ("arb-rc", lambda W, H: arb_quantize(W, H, variant="rc")),
        ]
    }
    assert rel["arb-x"] < 0.9 * rel["billm"] < 0.9 * rel["sign"], rel
    assert rel["arb-rc"] < rel["billm"], rel


def test_unknown_variant_and_order():
    with pytest.raises(ValueError, match="variant"):
        arb_quantize(torch.randn(4, 8), torch.eye(8), variant="braq")
    with pytest.raises(ValueError, match="planes"):
        arb_binarize(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool), order=3)
