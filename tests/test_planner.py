"""MoBiE's bit planner: layout candidates, budget filling, and the choice by held-back error."""

import pytest
import torch

from torchao_mobie.algorithms import cejd as C
from torchao_mobie.algorithms.planner import Plan, bits_estimate, plan_candidates, select_plan
from torchao_mobie.calibration.experts import ExpertStatsCollector
from torchao_mobie.config import MoBiEConfig, QuantContext


def _spd(E, n, g, tokens=None):
    X = torch.randn(E, tokens or 4 * n, n, generator=g)
    return X.transpose(1, 2) @ X / X.shape[1]


@pytest.mark.parametrize("side,sal,planes", [("input", 0, 1), ("input", 5, 1), ("output", 7, 1), ("none", 24, 1),
                                             ("none", 0, 1), ("none", 3, 3), ("output", 0, 2)])
def test_bits_estimate_matches_the_stored_bits(side, sal, planes):
    g = torch.Generator().manual_seed(0)
    E, m, n = 6, 16, 24
    W, H = torch.randn(E, m, n, generator=g), _spd(E, n, g)
    res = C.cejd_quantize(W, H, side=side, backbone_dtype="int8", rounds=1, salient_cols=sal, planes=planes)
    assert bits_estimate(E, m, n, side, "int8", sal, planes) == pytest.approx(res.bits.all_inclusive_bits, rel=1e-9)
    assert (res.factors.sign_x is not None) == (planes > 1)
    # a second plane exists on the output side and without a backbone too
    assert (res.factors.sign2 is not None) == (sal > 0)
    torch.testing.assert_close(res.weight, C.reconstruct(res.factors))


def test_candidates_fill_the_budget_with_full_planes_then_salient_columns():
    E, m, n = 32, 192, 256
    plans = {p.side: p for p in plan_candidates(E, m, n, 1.5, ["input", "output", "none"], "int8")}
    assert set(plans) == {"input", "output", "none"}
    for p in plans.values():
        assert p.bits <= 1.5
        # one more salient column would break the cap
        assert bits_estimate(E, m, n, p.side, "int8", p.salient + 1) > 1.5 - 0.02
        assert p.planes == 1
    # a larger cap buys whole further planes (a salient plane never covers every column), then columns
    for cap, planes in ((2.5, 2), (4.0, 3)):
        for p in plan_candidates(E, m, n, cap, ["input", "output", "none"], "int8"):
            assert p.planes == planes and 0 < p.salient < n and p.bits <= cap
            assert bits_estimate(E, m, n, p.side, "int8", p.salient + 1, p.planes) > cap - 0.02
    assert {p.planes for p in plan_candidates(E, m, n, 9.0, ["none"], "int8")} == {4}
    # a backbone that alone breaks the cap is no candidate; nothing fitting still gives one plan
    tight = plan_candidates(8, 64, 64, 1.2, ["input", "output", "none"], "int8")
    assert [p.side for p in tight] == ["none"]
    assert plan_candidates(8, 64, 64, 1.01, ["input"], "int8") == [Plan("input", "int8", 0,
                                                                          bits_estimate(8, 64, 64, "input", "int8"))]


def test_select_plan_takes_the_lowest_score_and_skips_fitting_a_single_plan():
    plans = [Plan("input", "int8", 1, 1.4), Plan("output", "int8", 2, 1.4), Plan("none", "int8", 3, 1.4)]
    score = {"input": 2.0, "output": float("nan"), "none": 1.0}
    best, fitted, scores = select_plan(plans, lambda p: p.side, lambda s: score[s])
    assert best.side == "none" and fitted == "none" and scores[1] == float("inf")
    calls = []
    assert select_plan(plans[:1], calls.append, len) == (plans[0], None, []) and calls == []


def _experts(kind, E=16, m=48, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "shared":  # every expert is a small-scale variation of one input-side basis
        S = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[:, None]
        return torch.randn(E, m, n, generator=g).sign() @ S + 0.01 * torch.randn(E, m, n, generator=g)
    return torch.randn(E, m, n, generator=g)  # unrelated experts: a backbone only costs bits


def _held_back_context(W, g, projection="weight", memory=None, name="x"):
    """A context as the pipeline builds it: fit-part Hessians, and a judge returning one layer error per
    held-back "sequence" (its own Hessian)."""
    E, m, n = W.shape
    fit = _spd(E, n, g, 96)
    seqs = torch.stack([_spd(E, n, g, 8) for _ in range(8)])
    H = (fit * 96 + seqs.sum(0) * 8) / 160
    fc = torch.full((E,), 96)
    judge = lambda What: torch.stack([C.layer_objective(W, What, s) for s in seqs])  # noqa: E731
    ctx = QuantContext(name=name, projection=projection, token_counts=torch.full((E,), 160),
                       calibration_split=(fit, fc), judge=judge, plan_memory=memory)
    return H, ctx


@pytest.mark.parametrize("kind,expect", [("shared", {"input"}), ("unrelated", {"none"})])
def test_mobie_chooses_the_layout_from_held_back_error(kind, expect):
    g = torch.Generator().manual_seed(2)
    W = _experts(kind)
    H, ctx = _held_back_context(W, g)
    res = MoBiEConfig(max_bits=1.9).quantize_experts(W, H, context=ctx)
    assert res.factors.side in expect
    assert res.bits.all_inclusive_bits <= 1.9
    # the chosen layout is never worse than per-expert factors at the same budget (held-back error)
    alone = MoBiEConfig(max_bits=1.9, cejd=False).quantize_experts(W, H, context=ctx)
    assert ctx.judge(res.weight).sum() <= 1.02 * ctx.judge(alone.weight).sum()
    # without a judge (torchao's observe/convert flow) per-expert factors, no candidate fits
    ctx.judge = None
    assert MoBiEConfig(max_bits=1.9).quantize_experts(W, H, context=ctx).factors.side == "none"


def test_collector_keeps_the_held_back_tokens_apart():
    from torchao_mobie.integrations.transformers import discover_moe_layout
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    info = discover_moe_layout(model).experts()[0]
    T = 40
    x, idx = torch.randn(T, 32), torch.randint(0, 4, (T, 2))
    held = torch.arange(T) % 3 == 0
    both = ExpertStatsCollector(info, heldback=True, min_expert_tokens=1)
    both.heldback_mask = held
    both.observe(x, idx)
    only_held, only_fit = ExpertStatsCollector(info, min_expert_tokens=1), ExpertStatsCollector(info, min_expert_tokens=1)
    only_held.observe(x[held], idx[held])
    only_fit.observe(x[~held], idx[~held])
    for p in ("gate_up_proj", "down_proj"):
        h = both.finalize(p)
        fit, fc = h.split
        ref = only_fit.finalize(p)
        keep = [e for e in range(4) if e not in h.fallback_experts and ref.counts[e] > 0]
        assert len(keep) >= 3 and fc.tolist() == ref.counts.tolist()
        torch.testing.assert_close(fit[keep], ref.hessian[keep])
        torch.testing.assert_close(h.counts, ref.counts + only_held.finalize(p).counts)


def test_a_joint_layout_needs_a_clear_held_back_win_to_displace_per_expert_factors():
    plans = [Plan("input", "int8", 0, 1.4), Plan("none", "int8", 8, 1.4)]
    base = torch.tensor([4.0, 4.2, 3.9, 4.1, 4.0, 4.3, 3.8, 4.1], dtype=torch.float64)
    noisy = base + torch.tensor([-0.02, 0.015, -0.02, 0.01, -0.015, 0.02, -0.02, 0.012], dtype=torch.float64)
    clear = base - 0.01 + 0.001 * torch.arange(8)
    for joint, expect in ((noisy, "none"), (clear, "input")):
        scores = {"input": joint, "none": base}
        assert float(joint.mean()) < float(base.mean())  # the joint layout has the lower mean either way
        best, _, means = select_plan(plans, lambda p: p.side, lambda s: scores[s])
        assert best.side == expect and means == [float(joint.mean()), float(base.mean())]
    # with z = 0 the lower mean wins
    assert select_plan(plans, lambda p: p.side, lambda s: {"input": noisy, "none": base}[s], z=0.0)[0].side == "input"


def test_gate_up_target_gives_down_proj_its_full_plane_first():
    from torchao_mobie.algorithms.planner import DOWN_SLACK, MARGIN, gate_up_target

    sides = ["input", "output", "none"]
    E, hidden, inter = 32, 160, 64
    t = gate_up_target(E, hidden, inter, 1.5, sides, "int8")
    down_full = bits_estimate(E, hidden, inter, "none", "int8", 0, 2)  # two full planes
    out_base = bits_estimate(E, 2 * inter, hidden, "output", "int8")
    # gate_up gets what down_proj's full plane leaves, here too little for an output-side backbone
    assert t == pytest.approx((4.5 - down_full - MARGIN - DOWN_SLACK) / 2) and t < out_base + MARGIN
    cands = plan_candidates(E, 2 * inter, hidden, t + MARGIN, sides, "int8")
    assert [p.side for p in cands] == ["none"] and cands[0].bits <= t + MARGIN
    assert gate_up_target(E, hidden, inter, 2.2, sides, "int8") == pytest.approx((6.6 - down_full - 0.03) / 2)
    # from ~2.5 bits on, down_proj keeps a plane ahead of gate_up
    down3 = bits_estimate(E, hidden, inter, "none", "int8", 0, 3)
    t2 = gate_up_target(E, hidden, inter, 3.0, sides, "int8")
    assert t2 == pytest.approx((9.0 - down3 - 0.03) / 2) and t2 < down3
    # whatever gate_up spends up to its target, down_proj's share still holds its full planes
    E, hidden, inter = 32, 512, 192
    for cap, planes in ((1.5, 2), (2.2, 2), (3.0, 3), (4.0, 4)):
        g = max(p.bits for p in plan_candidates(E, 2 * inter, hidden, gate_up_target(E, hidden, inter, cap, sides, "int8")
                                                + MARGIN, sides, "int8"))
        assert g <= gate_up_target(E, hidden, inter, cap, sides, "int8")
        down = plan_candidates(E, hidden, inter, 3 * cap - 2 * g - DOWN_SLACK, ["none"], "int8")[0]
        assert down.planes == planes, (cap, down)


def test_later_layers_only_try_the_layouts_that_won():
    g = torch.Generator().manual_seed(3)
    W = _experts("unrelated")
    E, m, n = W.shape
    memory, fits, per_layer = {}, [], []
    cfg = MoBiEConfig(max_bits=1.9)
    import torchao_mobie.algorithms.cejd as cejd_module

    real = cejd_module.cejd_quantize

    def counting(*a, **k):
        fits.append(k["side"])
        return real(*a, **k)

    cejd_module.cejd_quantize = counting
    try:
        for layer in range(3):
            H, ctx = _held_back_context(W, g, memory=memory, name=f"l{layer}")
            assert cfg.quantize_experts(W, H, context=ctx).factors.side == "none"
            per_layer.append(len(fits) - sum(per_layer))
    finally:
        cejd_module.cejd_quantize = real
    assert memory["weight"] == {"probed": 1, "won": {"none"}}
    # layer 0: every candidate (at least a joint one and per-expert) plus the final fit; later: the final fit only
    assert per_layer[0] >= 3 and per_layer[1:] == [1, 1] and fits[-2:] == ["none", "none"]


def test_hold_back_moves_every_fourth_sequence_into_batches_of_its_own():
    from torchao_mobie.pipeline.batches import CalibrationBatch as _Batch
    from torchao_mobie.calibration.heldback import hold_back

    ids = torch.arange(10)[:, None].repeat(1, 3)
    batches = [_Batch(ids[:4], None), _Batch(ids[4:8], torch.ones(4, 3)), _Batch(ids[8:], None)]
    out = hold_back(batches, _Batch)
    kept = torch.cat([b.input_ids[:, 0] for b in out if not b.heldback]).tolist()
    held = torch.cat([b.input_ids[:, 0] for b in out if b.heldback]).tolist()
    assert kept == [0, 1, 2, 4, 5, 6, 8, 9] and held == [3, 7]
    assert [b.heldback for b in out] == [False, False, False, True, True]  # held batches last
    assert out[4].attention_mask.shape == (1, 3)


def test_judge_is_the_held_back_lm_loss_and_restores_the_weights():
    """At the first layer the judge of the unchanged weights is the full-precision model's NLL on the
    held-back sequences; a damaged candidate scores worse; the parameter is left as it was."""
    import copy

    import torch.nn.functional as F

    from torchao_mobie import quantize_model
    from torchao_mobie.zoo import load_zoo_model

    fp, _ = load_zoo_model("micro-qwen3moe")
    calib = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    seen = {}

    class Spy(MoBiEConfig):
        def quantize_experts(self, W3d, H3d, *, context=None):
            if not seen and context.judge is not None:
                param = q.get_parameter(context.name)
                before = param.detach().clone()
                seen["same"] = context.judge(W3d)
                seen["noisy"] = context.judge(W3d + 0.5 * W3d.std() * torch.randn_like(W3d))
                seen["restored"] = torch.equal(param.detach(), before)
            return super().quantize_experts(W3d, H3d, context=context)

    q = copy.deepcopy(fp)
    quantize_model(q, Spy(), calib, progress=False)
    held = calib[3::4]
    with torch.no_grad():
        logits = fp(input_ids=held).logits.float()
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), held[:, 1:], reduction="none").mean(1).double()
    torch.testing.assert_close(seen["same"], ref, atol=1e-4, rtol=1e-4)
    assert float(seen["noisy"].mean()) > float(seen["same"].mean())
    assert seen["restored"]


def test_a_joint_layout_that_loses_after_the_probe_is_not_tried_again():
    """Layer 0 (the probe) is won by an input-side backbone, layer 1 by per-expert factors: layer 2 only fits
    per-expert factors, although an input-side backbone would win there again."""
    g = torch.Generator().manual_seed(2)
    memory, sides = {}, []
    import torchao_mobie.algorithms.cejd as cejd_module

    real = cejd_module.cejd_quantize
    fits = []
    cejd_module.cejd_quantize = lambda *a, **k: fits.append(k["side"]) or real(*a, **k)
    try:
        for layer, kind in enumerate(["shared", "unrelated", "shared"]):
            H, ctx = _held_back_context(_experts(kind), g, memory=memory, name=f"l{layer}")
            sides.append(MoBiEConfig(max_bits=1.9).quantize_experts(_experts(kind), H, context=ctx).factors.side)
            fits.append("|")
    finally:
        cejd_module.cejd_quantize = real
    per_layer = "".join(f[0] for f in fits).split("|")[:3]
    assert sides == ["input", "none", "none"], sides
    assert "i" in per_layer[1] and per_layer[2] == "n", per_layer  # layer 1 judged the backbone, layer 2 did not
    assert memory["weight"] == {"probed": 2, "won": {"none"}}


def test_candidates_fit_the_fit_weight_and_the_final_fit_the_passed_weight():
    """fp_target with held-back sequences: the candidates approximate ``context.fit_weight`` (the target over the
    sequences not held back), the fit on every sequence approximates the weight passed (over every token)."""
    import dataclasses

    import torchao_mobie.algorithms.cejd as cejd_module

    g = torch.Generator().manual_seed(2)
    W = _experts("shared")
    H, ctx = _held_back_context(W, g)
    fit_weight = W + 0.01 * torch.randn(W.shape, generator=g)
    ctx = dataclasses.replace(ctx, fit_weight=fit_weight)
    real, seen = cejd_module.cejd_quantize, []
    cejd_module.cejd_quantize = lambda Wx, Hx, **k: seen.append(Wx) or real(Wx, Hx, **k)
    try:
        MoBiEConfig(max_bits=1.9).quantize_experts(W, H, context=ctx)
    finally:
        cejd_module.cejd_quantize = real
    assert len(seen) >= 3  # at least two candidates, then the final fit
    assert all(torch.equal(x, fit_weight) for x in seen[:-1]) and torch.equal(seen[-1], W)
