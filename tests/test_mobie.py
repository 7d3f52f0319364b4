"""MoBiE: CEJD decomposition/refits, GLAS gradient weights, NGES metric, config, end to end (fast)."""

from __future__ import annotations

import pytest
import torch

from torchao_mobie.algorithms import cejd as C
from torchao_mobie.algorithms.nges import router_metric, routing_projector
from torchao_mobie.config import MoBiEConfig, QuantContext

torch.set_num_threads(1)


def _problem(E=4, m=24, n=16, T=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, n, generator=g)
    W = torch.randn(E, m, n, generator=g) @ shared / n**0.5 + 0.3 * torch.randn(E, m, n, generator=g)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    X = torch.randn(E, T, n, generator=g) @ mix
    H = X.transpose(-1, -2) @ X / T
    return W, H, X


@pytest.mark.parametrize("shape,side", [((4, 24, 16), "input"), ((4, 16, 24), "output")])
def test_decomposition_without_binarization_is_exact(shape, side):
    E, m, n = shape
    W, H, _ = _problem(E, m, n)
    assert C.choose_side(m, n) == side
    bb = C.init_backbone(W, H, side)
    fm = C.factor_metrics(W, H, torch.block_diag(*bb.unbind(0)), side, ridge=0.0)
    M = bb[0]
    What = M @ fm.A if side == "output" else fm.A @ M
    torch.testing.assert_close(What, W, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(4, 24, 16), (4, 16, 24)])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_parts_reconstruct_documented_formula(shape, dtype):
    W, H, _ = _problem(*shape)
    cfg = MoBiEConfig(backbone_dtype=dtype, glas=False, nges=False, side=C.choose_side(*shape[1:]))
    res = cfg.quantize_experts(W, H, context=QuantContext(projection="down_proj"))
    f = res.factors
    for e in range(W.shape[0]):
        p = f.experts(e)
        assert p.sign.dtype == torch.int8 and set(p.sign.unique().tolist()) <= {-1, 1}
        Q = p.row_scale[0].float()[:, None] * p.sign[0].float() * p.col_scale[0].float()[None, :]
        if p.sign2 is not None:
            Q = Q + p.row_scale[0].float()[:, None] * p.sign2[0].float() * p.col_scale2[0].float()[None, :]
        bb = p.backbone
        assert bb.dtype == dtype
        blocks = bb.blocks.float() * (bb.scale.float()[:, :, None] if dtype == "int8" else 1)
        M = torch.block_diag(*blocks.unbind(0))
        expect = M @ Q if p.side == "output" else Q @ M
        torch.testing.assert_close(res.weight[e], expect, atol=1e-6, rtol=1e-6)
        assert p.backbone is f.backbone  # shared by every expert, stored once
    assert f.bit_budget().backbone_bits == f.backbone.bits()  # counted once


def test_transformed_hessian_matches_layer_output_error():
    W, H, X = _problem(3, 24, 16)
    bb = C.init_backbone(W, H, "input")
    S = bb[0]
    fm = C.factor_metrics(W, H, S, "input", ridge=0.0)
    Q = torch.sign(fm.A) * fm.A.abs().mean()
    direct = sum(((fm.A[e] - Q[e]) @ S @ X[e].t()).pow(2).sum() / X.shape[1] for e in range(3))
    via = ((fm.A - Q) @ fm.Hf * (fm.A - Q)).sum()
    torch.testing.assert_close(via, direct, rtol=1e-3, atol=1e-5)
    # output side: left metric MᵀM
    W2, H2, X2 = _problem(3, 16, 24)
    M = C.init_backbone(W2, H2, "output")[0]
    fm2 = C.factor_metrics(W2, H2, M, "output", ridge=0.0)
    Q2 = torch.sign(fm2.A) * fm2.A.abs().mean()
    direct2 = sum((M @ (fm2.A[e] - Q2[e]) @ X2[e].t()).pow(2).sum() / X2.shape[1] for e in range(3))
    D = fm2.A - Q2
    via2 = ((fm2.Gf @ D @ fm2.Hf) * D).sum()
    torch.testing.assert_close(via2, direct2, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("shape,side,blocks", [((4, 24, 16), "input", 1), ((4, 16, 24), "output", 1),
                                               ((4, 16, 24), "output", 2)])
def test_backbone_refit_never_increases_objective(shape, side, blocks):
    W, H, _ = _problem(*shape)
    bb = C.init_backbone(W, H, side, blocks)
    full = torch.block_diag(*bb.unbind(0))
    fm = C.factor_metrics(W, H, full, side)
    a, b = C._init_scales(fm.A)
    B, b, _, _ = C.gptq_signs(fm.A, fm.Hf, a)
    B, a, b, _, _ = C.refit_scales(B, a, b, fm, 2)
    Q = a[:, :, None] * B * b[:, None, :]
    before = C._obj(W, Q, full, side, H, None)
    nb = C.refit_backbone(W, H, Q, bb, side)
    after = C._obj(W, Q, torch.block_diag(*nb.unbind(0)), side, H, None)
    assert after <= before * (1 + 1e-6)
    # a random perturbation of the refit backbone is never better (it is the least-squares optimum)
    pert = C._obj(W, Q, torch.block_diag(*(nb + 1e-2 * torch.randn_like(nb)).unbind(0)), side, H, None)
    assert after <= pert


def test_scale_refit_and_sign_refinement_do_not_increase_objective():
    W, H, _ = _problem(4, 24, 16)
    bb = C.init_backbone(W, H, "input")
    fm = C.factor_metrics(W, H, bb[0], "input")
    a, b = C._init_scales(fm.A)
    B, b, _, _ = C.gptq_signs(fm.A, fm.Hf, a)

    def f(B, a, b):
        Q = a[:, :, None] * B * b[:, None, :]
        return float(((Q @ fm.Hf) * Q).sum() - 2 * (Q * fm.T).sum())

    f0 = f(B, a, b)
    B, a, b, _, _ = C.refit_scales(B, a, b, fm, 2)
    f1 = f(B, a, b)
    B = C.refine_signs(B.clone(), a, b, fm, 2)
    f2 = f(B, a, b)
    assert f1 <= f0 + 1e-6 and f2 <= f1 + 1e-6


def test_sign_refinement_with_a_shared_left_metric_matches_the_per_expert_path():
    """NGES's output metric is one matrix expanded over the experts; refine_signs multiplies by it once
    per column for all experts. Same flips as with a materialized per-expert metric."""
    W, H, _ = _problem(4, 24, 16)
    P = torch.randn(24, 24, generator=torch.Generator().manual_seed(1)) / 24
    G = torch.eye(24) + 5 * P @ P.t()
    fm = C.factor_metrics(W, H, C.init_backbone(W, H, "input")[0], "input", G)
    assert fm.Gf.stride(0) == 0
    a, b = C._init_scales(fm.A)
    B = torch.where(fm.A >= 0, 1.0, -1.0)
    shared = C.refine_signs(B.clone(), a, b, fm, 2, block=8)
    own = C.refine_signs(B.clone(), a, b, C.FactorMetrics(fm.Gf.contiguous(), fm.Hf, fm.T, fm.A), 2, block=8)
    assert bool((shared != B).any())
    assert torch.equal(shared, own)


def test_batched_solves_are_right_with_several_threads():
    """torch 2.13's batched CPU LU fails or returns garbage with > 1 thread once n >= ~160 (the zoo's
    qwen3moe-32e gate_up factor is [32, 160, 160]); CEJD's solves must not depend on the thread count."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 192, 192, generator=g)
    A = A @ A.transpose(-1, -2) / 192 + torch.eye(192)
    B = torch.randn(8, 192, 5, generator=g)
    W, H, _ = _problem(4, 192, 176)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        X = C._solve(A, B)
        multi = C.cejd_quantize(W, H, side="input", rounds=1, refine=1, salient_cols=8)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(A @ X, B, atol=1e-4, rtol=1e-4)
    assert torch.get_num_threads() == threads
    single = C.cejd_quantize(W, H, side="input", rounds=1, refine=1, salient_cols=8)
    assert abs(multi.objective - single.objective) <= 1e-3 * single.objective


def test_log8_scale_codes_round_trip():
    from torchao_mobie.algorithms.scale_codes import decode_log8, encode_log8

    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.randn(5, 40, generator=g) * 1.5)  # ratios up to ~e^9 within an expert
    v[1, :3] = 0.0
    v[2] = 0.0  # an expert without any scale (all second-plane slots unused)
    v[3] = 0.7  # constant scales
    codes, grid = encode_log8(v)
    assert codes.dtype == torch.uint8 and grid.shape == (5, 2) and grid.dtype == torch.float16
    out = decode_log8(codes, grid).float()
    assert bool((out[v == 0] == 0).all()) and bool((codes[v == 0] == 0).all())
    pos = v > 0
    rel = (out[pos] / v[pos] - 1).abs()
    assert float(rel.max()) < 0.03, float(rel.max())  # log2 range ~26 octaves / 254 steps -> < 3.6% / 2
    assert float((out[3] / v[3] - 1).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="non-negative"):
        encode_log8(-v)


def test_kronecker_preconditioned_backbone_refit_is_exact_in_few_iterations():
    """The input-side backbone solve ``Σ_e K_e S H_e = R`` is preconditioned with the nearest Kronecker
    product; with similar experts (CEJD's premise) a handful of CG steps reaches the exact solution, which
    is computed here from the vectorized system."""
    E, m, n = 4, 24, 10
    W, H, _ = _problem(E, m, n, T=400)
    H = H.mean(0, keepdim=True) * torch.tensor([1.0, 2.0, 0.5, 1.5])[:, None, None] + 0.01 * H
    bb = C.init_backbone(W, H, "input")
    fm = C.factor_metrics(W, H, bb[0], "input")
    a, b = C._init_scales(fm.A)
    B, b, _, _ = C.gptq_signs(fm.A, fm.Hf, a)
    Q = a[:, :, None] * B * b[:, None, :]
    Q64, W64, H64 = Q.double(), W.double(), C._sym(H).double()
    K = Q64.transpose(-1, -2) @ Q64
    op = sum(torch.kron(K[e].contiguous(), H64[e].t().contiguous()) for e in range(E))  # row-major vec(K S H) = (K ⊗ Hᵀ) vec(S)
    rhs = (Q64.transpose(-1, -2) @ W64 @ H64).sum(0)
    exact = torch.linalg.solve(op, rhs.reshape(-1)).reshape(n, n)
    f_exact = float(C._obj(W64, Q64, exact, "input", H64, None))
    nb = C.refit_backbone(W, H, Q, bb, "input", cg_iters=4, tol=0.0)
    f_cg = float(C._obj(W, Q, nb[0], "input", H, None))
    assert f_cg <= f_exact * (1 + 1e-4), (f_cg, f_exact)


@pytest.mark.parametrize("left_metric", [False, True])
def test_two_plane_scale_refit_is_stationary(left_metric):
    """The column-scale solve gathers only the salient columns' second-plane scales (n + k unknowns);
    at its result the objective's gradient in every column scale, first and second plane, vanishes."""
    E, m, n, k = 3, 20, 12, 3
    W, H, _ = _problem(E, m, n, T=300)
    bb = C.init_backbone(W, H, "input")
    G = None
    if left_metric:
        P = torch.randn(m, 2)
        G = torch.eye(m) + P @ P.t()
    fm = C.factor_metrics(W, H, bb[0], "input", G)
    a, b = C._init_scales(fm.A)
    sal = C.select_salient(fm, k)
    B, b, B2, b2 = C.gptq_signs(fm.A, fm.Hf, a, None if G is None else fm.Gf.diagonal(dim1=-2, dim2=-1), 0.01, sal)
    B, a, b, B2, b2 = C.refit_scales(B, a, b, fm, 1, B2=B2, b2=b2, salient=sal)
    assert bool((b2[~sal] == 0).all())
    a64, B64, B264, Hf, T = a.double(), B.double(), B2.double(), fm.Hf.double(), fm.T.double()
    Gf = None if G is None else fm.Gf.double()
    x = torch.cat([b, b2], -1).double().requires_grad_(True)
    Q = a64[:, :, None] * (B64 * x[:, None, :n] + B264 * x[:, None, n:])
    f = ((Q @ Hf if Gf is None else Gf @ Q @ Hf) * Q).sum() - 2 * (Q * T).sum()
    (g,) = torch.autograd.grad(f, x)
    scale = (x.detach().abs() * g.abs()).sum() + 1e-30
    free = torch.cat([torch.ones_like(sal), sal], -1)
    assert float(g[free].abs().max() * x.detach()[free].abs().mean()) < 1e-4 * float(f.detach().abs()), g[free]
    assert float(scale) > 0


def test_polish_against_the_stored_backbone_never_hurts():
    W, H, _ = _problem(4, 24, 16)
    kw = dict(side="input", backbone_dtype="int8", salient_cols=2, rounds=2, refine=1)
    plain = C.cejd_quantize(W, H, polish=0, **kw).objective
    polished = C.cejd_quantize(W, H, polish=1, **kw).objective
    assert polished <= plain * (1 + 1e-4)


def test_alternation_never_worsens_an_expert_with_almost_no_tokens():
    """An expert whose Hessian is ~1e-5 of the others' and has near-dead input directions (two routed
    tokens on top of a fallback) made the closed-form refits diverge (fp16 scales overflowed, NaN weights,
    mixtral-8e seed 2). Every binarize and backbone step must keep the objective from rising, and the stored
    weights must be finite."""
    E, m, n = 4, 48, 32
    W, H, _ = _problem(E, m, n, T=400, seed=3)
    d = torch.logspace(-4, 0, n)  # input directions with very different energy
    H = H * d[None, :, None] * d[None, None, :]
    H[1] = H[1] * 1e-5 + 1e-3 * torch.outer(W[1, 0], W[1, 0]) * 1e-9
    res = C.cejd_quantize(W, H, side="input", backbone_dtype="int8", salient_cols=4, rounds=3, refine=1)
    steps = [v for k, v in res.history if k != "stored"]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(steps, steps[1:])), res.history  # CG: float noise
    assert torch.isfinite(res.weight).all()
    assert torch.isfinite(res.factors.row_scale).all() and torch.isfinite(res.factors.col_scale).all()


def test_rank_damp_ridges_exactly_the_experts_with_singular_hessians():
    """An expert routed fewer tokens than its inputs has rank(H) <= tokens: its Hessian (and only its,
    fallback experts excepted) gets rank_damp * mean diag * I after the usual mixing."""
    from torchao_mobie.config import QuantContext
    from torchao_mobie.methods.mobie import joint_hessians

    W, H, X = _problem(4, 24, 16, T=200)
    H[1] = X[1, :5].T @ X[1, :5] / 5  # 5 tokens for 16 inputs: singular
    H[3] = X[3, :3].T @ X[3, :3] / 3  # 3 tokens, but on the layer-level fallback Hessian in the pipeline
    ctx = QuantContext(projection="gate_up_proj", token_counts=torch.tensor([200, 5, 200, 3]), fallback_experts=[3])
    plain = joint_hessians(MoBiEConfig(glas=False, rank_damp=0.0), H, ctx)
    damped = joint_hessians(MoBiEConfig(glas=False, rank_damp=0.01), H, ctx)
    torch.testing.assert_close(damped[[0, 2, 3]], plain[[0, 2, 3]], rtol=0, atol=0)
    ridge = 0.01 * plain[1].diagonal().mean() * torch.eye(16)
    torch.testing.assert_close(damped[1], plain[1] + ridge)
    assert torch.linalg.matrix_rank(plain[1]) <= 5 < torch.linalg.matrix_rank(damped[1])
    with pytest.raises(ValueError, match="MoBiEConfig.rank_damp"):
        MoBiEConfig(rank_damp=-0.1)


def test_bits_accounting():
    E, m, n = 4, 24, 16
    W, H, _ = _problem(E, m, n)
    res = C.cejd_quantize(W, H, side="input", backbone_dtype="int8", salient_cols=2, rounds=1)
    b = res.bits
    assert b.n_weights == E * m * n
    assert b.sign_bits == E * m * n + E * 2 * m
    assert b.backbone_bits == n * n * 8 + n * 16  # int8 values + one fp16 scale per row
    assert b.param_bits == 8 * (E * (m + n) + E * 2) + 16 * 6 * E  # 8-bit scale codes + per-expert (lo, step) x3
    assert b.bitmap_bits == E * n
    res16 = C.cejd_quantize(W, H, side="output", blocks=2, backbone_dtype="bfloat16", rounds=1)
    assert res16.bits.backbone_bits == 2 * (m // 2) ** 2 * 16
    assert res16.bits.sign_bits == E * m * n
    total = (b.sign_bits + b.bitmap_bits + b.param_bits + b.backbone_bits) / b.n_weights
    assert abs(b.all_inclusive_bits - total) < 1e-12


def test_nges_metric_reduces_router_component():
    torch.manual_seed(0)
    E, m, n = 8, 32, 16  # down_proj: out = hidden (32), in = expert width (16)
    W, H, X = _problem(E, m, n, seed=3)
    router = torch.randn(6, m)
    P = routing_projector(router)
    G = router_metric([(router, None)], mu=20.0)
    plain = C.cejd_quantize(W, H, G=None, rounds=2, refine=1)
    guided = C.cejd_quantize(W, H, G=G, rounds=2, refine=1)

    def comp(What):
        D = (W - What) @ X.transpose(-1, -2)  # [E, m, T]
        return float((P @ D).pow(2).sum())

    assert comp(guided.weight) < comp(plain.weight)


def test_nges_projector_keeps_the_common_logit_shift_for_sigmoid_routers():
    """Softmax top-k ignores a shift common to all logits, so the projector drops it; a sigmoid router with a
    score-correction bias (DeepSeek-V3) does not, so its projector keeps it (and the rest of the row space)."""
    from torchao_mobie.pipeline.sequential import _downstream_routers
    from torchao_mobie.integrations.transformers import discover_moe_layout

    router = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    common = torch.linalg.pinv(router) @ torch.ones(6)  # an error that moves every logit by the same amount
    torch.testing.assert_close(router @ common, torch.ones(6), rtol=1e-4, atol=1e-4)
    Pc, Pu = routing_projector(router), routing_projector(router, centered=False)
    assert float((Pc @ common).norm()) < 1e-4 * float(common.norm())
    torch.testing.assert_close(Pu @ common, common, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(Pu @ Pc, Pc, rtol=1e-4, atol=1e-5)  # the centered space is inside
    assert abs(float(Pu.trace()) - 6) < 1e-3 and abs(float(Pc.trace()) - 5) < 1e-3
    G = router_metric([(router, False), (router, True)], mu=1.0, decay=1.0)
    torch.testing.assert_close(G, torch.eye(32) + (Pu + Pc) / 2)
    from transformers import AutoModelForCausalLM
    from torchao_mobie.zoo import HELDOUT

    flags = {}
    for name in ("heldout-deepseekv3-9m", "heldout-qwen3moe-12m"):
        cfg = HELDOUT[name].build_config()
        cfg.num_hidden_layers = 3
        layout = discover_moe_layout(AutoModelForCausalLM.from_config(cfg))
        flags[name] = [c for _, c in _downstream_routers(layout, -1)]
    assert flags == {"heldout-deepseekv3-9m": [False, False], "heldout-qwen3moe-12m": [True, True, True]}


def test_glas_weights_match_autograd():
    from torchao_mobie.pipeline.batches import CalibrationBatch as _Batch
    from torchao_mobie.calibration.gradients import compute_glas_weights
    from torchao_mobie.integrations.transformers import discover_moe_layout
    from torchao_mobie.zoo import load_zoo_model

    model, _ = load_zoo_model("micro-qwen3moe")
    layout = discover_moe_layout(model)
    experts = layout.experts()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    glas = compute_glas_weights(model, experts, [_Batch(ids, None)])

    # brute force: per-pair expert outputs as explicit tensors, gradients by autograd
    info = experts[1]
    mod = info.module
    pairs = {}
    import types

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for s in range(top_k_index.shape[1]):
                e = int(top_k_index[t, s])
                zg = hidden_states[t] @ info.weight("gate_up_proj")[e].t()
                zg.retain_grad()
                zd = self._apply_gate(zg) @ info.weight("down_proj")[e].t()
                zd.retain_grad()
                pairs[(t, s)] = (zg, zd)
                out[t] = out[t] + top_k_weights[t, s] * zd
        return out

    try:
        mod.forward = types.MethodType(forward, mod)
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
    finally:
        del mod.forward
    gu = glas.gate_up[info.fqn][0]
    dn = glas.down[info.fqn][0]
    root = compute_glas_weights(model, experts, [_Batch(ids, None)], power=0.5)
    torch.testing.assert_close(root.gate_up[info.fqn][0], gu.sqrt())
    torch.testing.assert_close(root.down[info.fqn][0], dn.sqrt())
    for (t, s), (zg, zd) in pairs.items():
        torch.testing.assert_close(gu[t, s], zg.grad.pow(2).mean(), rtol=1e-3, atol=1e-14)
        torch.testing.assert_close(dn[t, s], zd.grad.pow(2).mean(), rtol=1e-3, atol=1e-14)


def test_glas_samples_limits_the_gradient_pass_to_the_leading_batches(monkeypatch):
    """With ``glas_samples`` the gradient-weighted Hessians come from the first batches only: layer 0's
    gate_up one equals that of a run calibrated on those batches alone (its inputs do not depend on the
    others; down_proj's do, through the binarized gate_up)."""
    from torchao_mobie.api import quantize_model
    from torchao_mobie.zoo import load_zoo_model

    seen = []
    orig = MoBiEConfig.quantize_experts

    def spy(self, W3d, H3d, *, context=None):
        seen.append((context.name, context.projection, context.guided_hessian.clone()))
        return orig(self, W3d, H3d, context=context)

    monkeypatch.setattr(MoBiEConfig, "quantize_experts", spy)
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for calib, cfg in ((ids, MoBiEConfig(glas_samples=2, rounds=1, refine=0, polish=0)),
                       (ids[:2], MoBiEConfig(rounds=1, refine=0, polish=0)),
                       (ids, MoBiEConfig(rounds=1, refine=0, polish=0))):
        seen.clear()
        quantize_model(load_zoo_model("micro-qwen3moe")[0], cfg, calib, progress=False, batch_size=2)
        runs.append([h for name, proj, h in seen if ".layers.0." in name and proj == "gate_up_proj"])
    sub, first_only, full = runs
    assert len(sub) == 1
    torch.testing.assert_close(sub[0], first_only[0])
    assert not torch.allclose(sub[0], full[0])


@pytest.mark.parametrize("field,value", [("backbone_dtype", "fp8"), ("gate_up_blocks", 0), ("glas_lambda", 1.5),
                                         ("nges_mu", -1.0), ("cejd", 1), ("rounds", 0), ("max_bits", 0.5),
                                         ("salient_cols", -1), ("refine", -1), ("glas_samples", 0),
                                         ("glas_power", 0.0), ("glas_power", 1.5)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"MoBiEConfig.{field}"):
        MoBiEConfig(**{field: value})


def test_end_to_end_micro_better_than_sign():
    import copy

    from torchao_mobie import quantize_model
    from torchao_mobie.config import SignBinaryConfig
    from torchao_mobie.zoo import load_zoo_model

    fp, _ = load_zoo_model("micro-qwen3moe")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 500, (8, 32), generator=g)
    test = torch.randint(3, 500, (4, 32), generator=g)
    errs = {}
    for name, cfg in (("mobie", MoBiEConfig()), ("sign", SignBinaryConfig())):
        q = copy.deepcopy(fp)
        rep = quantize_model(q, cfg, calib, progress=False)
        with torch.no_grad():
            lq, lf = q(input_ids=test).logits, fp(input_ids=test).logits
        assert torch.isfinite(lq).all()
        errs[name] = float((lq - lf).pow(2).mean())
        if name == "mobie":
            assert rep.bits.n_weights > 0 and rep.bits.all_inclusive_bits <= 2.2  # coarse layers' default cap
    assert errs["mobie"] < errs["sign"]


def test_glas_weights_do_not_depend_on_the_run_with_several_threads():
    """With 2 CPU threads the MoE backward's index accumulation summed in a run-dependent order, so the
    same calibration gave different GLAS weights (and quantized models) from run to run."""
    from torchao_mobie.pipeline.batches import CalibrationBatch as _Batch
    from torchao_mobie.calibration.gradients import compute_glas_weights
    from torchao_mobie.integrations.transformers import discover_moe_layout
    from torchao_mobie.zoo import load_zoo_model

    model, _ = load_zoo_model("qwen3moe-32e")
    experts = discover_moe_layout(model).experts()
    ids = torch.randint(3, 4000, (4, 256), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [compute_glas_weights(model, experts, [_Batch(ids, None)]) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored
    for r in runs[1:]:
        for fqn in r.gate_up:
            assert torch.equal(r.gate_up[fqn][0], runs[0].gate_up[fqn][0]), fqn
            assert torch.equal(r.down[fqn][0], runs[0].down[fqn][0]), fqn


def test_glas_weights_do_not_depend_on_how_sequences_are_batched():
    """Held-back sequences form smaller batches; a token's GLAS weight must not change with its batch."""
    from torchao_mobie.pipeline.batches import CalibrationBatch as _Batch
    from torchao_mobie.calibration.gradients import compute_glas_weights
    from torchao_mobie.integrations.transformers import discover_moe_layout
    from torchao_mobie.zoo import load_zoo_model

    model, _ = load_zoo_model("micro-qwen3moe")
    experts = discover_moe_layout(model).experts()
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    whole = compute_glas_weights(model, experts, [_Batch(ids, None)])
    split = compute_glas_weights(model, experts, [_Batch(ids[:3], None), _Batch(ids[3:], None)])
    for fqn in whole.gate_up:
        torch.testing.assert_close(torch.cat(split.gate_up[fqn]), whole.gate_up[fqn][0], rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(torch.cat(split.down[fqn]), whole.down[fqn][0], rtol=1e-3, atol=1e-9)
