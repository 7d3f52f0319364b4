"""The full-precision target (MoBiEConfig.fp_target): each expert projection is fit to the full-precision model's
output, i.e. its weight is replaced by ``W (C + λI)(H + λI)⁻¹`` before binarization, with ``H`` and ``C`` from the
quantized model's and the full-precision model's expert inputs on the same calibration tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import torchao_mobie as tm
from torchao_mobie.algorithms.fp_target import fp_target_weight
from torchao_mobie.calibration import ExpertStatsCollector
from torchao_mobie.integrations.transformers import discover_moe_layout
from test_pipeline import RecordingConfig, calib, forward_with_hooks, one_thread, tiny_model  # noqa: F401


@dataclass
class FPRecording(RecordingConfig):
    fp_target: bool = True
    fp_target_ridge: float = 0.05


@dataclass
class FPHeldRecording(FPRecording):
    """With held-back sequences (every 4th), as MoBiE's layout selection has them."""
    needs_heldback = True
    fp_target_refit: bool | None = True


def test_fp_target_weight_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    E, out, d, n = 3, 5, 6, 40
    W = torch.randn(E, out, d, generator=g)
    xq = torch.randn(E, n, d, generator=g, dtype=torch.float64)
    xf = xq + 0.3 * torch.randn(E, n, d, generator=g, dtype=torch.float64)
    H, C = xq.mT @ xq / n, xf.mT @ xq / n
    ridge = 0.1
    got = fp_target_weight(W, H.float(), C.float(), ridge, skip=[2])
    for e in range(2):  # stationary point of Σ||W' x_q − W x_fp||²/n + λ||W' − W||²
        lam = ridge * float(H[e].diagonal().mean())
        grad = got[e].double() @ H[e] - W[e].double() @ C[e] + lam * (got[e].double() - W[e].double())
        assert float(grad.abs().max()) < 1e-4
        assert not torch.allclose(got[e], W[e], atol=1e-3)
    assert torch.equal(got[2], W[2])  # skipped
    same = fp_target_weight(W, H.float(), H.float(), ridge)  # nothing upstream binarized: the weight itself
    assert torch.allclose(same, W, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        fp_target_weight(W, H[:, :2], C, ridge)
    with pytest.raises(ValueError, match="ridge"):
        fp_target_weight(W, H, C, 0.0)


def test_collector_cross_statistics_over_the_routed_tokens():
    model = tiny_model("qwen3_moe", layers=1)
    info = discover_moe_layout(model).experts()[0]
    g = torch.Generator().manual_seed(3)
    T, H = 24, info.hidden_dim
    x = torch.randn(T, H, generator=g)
    xf = x + 0.1 * torch.randn(T, H, generator=g)
    idx = torch.randint(0, info.num_experts, (T, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % info.num_experts
    col = ExpertStatsCollector(info, ("gate_up_proj", "down_proj"), min_expert_tokens=1, fp_target=True)
    col.fp_hidden, col.fp_gate_up = xf, info.weight("gate_up_proj").detach().clone()
    col.observe(x, idx)
    gu, dn = col.finalize("gate_up_proj"), col.finalize("down_proj")
    for e in range(info.num_experts):
        rows = (idx == e).any(-1)
        n = int(rows.sum())
        hq, counts = gu.fit_hessian
        assert int(counts[e]) == n
        torch.testing.assert_close(hq[e], x[rows].T @ x[rows] / n)
        torch.testing.assert_close(gu.cross[e], xf[rows].T @ x[rows] / n)
        a, af = info.down_input(x[rows], e), info.down_input(xf[rows], e)
        torch.testing.assert_close(dn.cross[e], af.T @ a / n)
    col = ExpertStatsCollector(info, ("gate_up_proj",), min_expert_tokens=1)  # off: no cross statistics
    col.observe(x, idx)
    assert col.finalize("gate_up_proj").cross is None


def _expert_inputs(model, ids):
    """Per MoE layer: the experts module's input rows and top-k indices (plain forward hooks on the call)."""
    out, handles = {}, []
    for info in discover_moe_layout(model).experts():
        handles.append(info.module.register_forward_pre_hook(
            lambda m, a, k, fqn=info.fqn: out.setdefault(fqn, []).append(
                ((a[0] if a else k["hidden_states"]).reshape(-1, m.gate_up_proj.shape[-1]).double(),
                 (a[1] if len(a) > 1 else k["top_k_index"]))), with_kwargs=True))
    forward_with_hooks(model, ids, handles)
    return {k: (torch.cat([a for a, _ in v]), torch.cat([b.reshape(-1, b.shape[-1]) for _, b in v])) for k, v in out.items()}


def _target(W, a, f, ridge):
    Hq, C = a.T @ a / len(a), f.T @ a / len(a)
    lam = ridge * float(Hq.detach().diagonal().mean())
    eye = torch.eye(len(Hq), dtype=torch.float64)
    return torch.linalg.solve(Hq + lam * eye, (W @ (C + lam * eye)).T).T


@pytest.mark.parametrize("family,held", [("qwen3_moe", False), ("mixtral", False), ("deepseek_v3", False),
                                         ("qwen3_moe", True), ("deepseek_v3", True)])
def test_each_projection_is_fit_to_the_full_precision_output(family, held):
    """The weight passed to the method is the target over every calibration token; with held-back sequences
    the candidates' target (``QuantContext.fit_weight``) is the one over the sequences not held back."""
    fp = tiny_model(family, layers=3)
    ids = calib(16)
    seq = torch.arange(ids.numel()) // ids.shape[1]  # the calibration sequence of each token row
    fit_rows = seq % 4 != 3  # heldback.hold_back: every 4th sequence
    q = copy.deepcopy(fp)
    cfg = (FPHeldRecording if held else FPRecording)(min_expert_tokens=1)
    tm.quantize_model(q, cfg, ids, progress=False)
    ref, got = _expert_inputs(fp, ids), _expert_inputs(q, ids)  # q's later inputs are the ones it was fit on
    infos = {i.fqn: i for i in discover_moe_layout(fp).experts()}
    qinfos = {i.fqn: i for i in discover_moe_layout(q).experts()}
    for k, fqn in enumerate(infos):
        info, (xf, _), (xq, idx) = infos[fqn], ref[fqn], got[fqn]
        for p in ("gate_up_proj", "down_proj"):
            W = info.weight(p).detach().double()
            passed, ctx = cfg.calls[f"{fqn}.{p}"][0].double(), cfg.calls[f"{fqn}.{p}"][2]
            assert (ctx.fit_weight is not None) == held
            for e in range(info.num_experts):
                rows = (idx == e).any(-1)
                if not bool(rows.any()):  # no token: a fallback Hessian, left as it is
                    assert torch.equal(passed[e], W[e])
                    continue
                a, f = xq[rows].float(), xf[rows].float()
                if p == "down_proj":  # q's binarized gate_up against fp's own
                    a, f = qinfos[fqn].down_input(a, e).double(), info.down_input(f, e).double()
                else:
                    a, f = a.double(), f.double()
                torch.testing.assert_close(passed[e], _target(W[e], a, f, cfg.fp_target_ridge), rtol=2e-3, atol=2e-4)
                if held:
                    keep = fit_rows[rows]
                    want = _target(W[e], a[keep], f[keep], cfg.fp_target_ridge)
                    torch.testing.assert_close(ctx.fit_weight[e].double(), want, rtol=2e-3, atol=2e-4)
                    if k > 0 or p == "down_proj":
                        assert not torch.allclose(ctx.fit_weight[e].double(), passed[e], rtol=1e-3, atol=1e-4)
            if k == 0 and p == "gate_up_proj":  # nothing binarized before it: the weight itself
                torch.testing.assert_close(passed, W, rtol=1e-4, atol=1e-5)
            elif k > 0 or p == "down_proj":
                assert not torch.allclose(passed, W, rtol=1e-3, atol=1e-4)


def test_off_fits_the_weight_itself_and_default_is_on():
    assert tm.MoBiEConfig().fp_target is True
    with pytest.raises(ValueError, match="fp_target_ridge"):
        tm.MoBiEConfig(fp_target_ridge=0)
    with pytest.raises(ValueError, match="fp_target must be a bool"):
        tm.MoBiEConfig(fp_target="yes")
    fp = tiny_model("qwen3_moe", layers=2)
    cfg = FPRecording(fp_target=False)
    tm.quantize_model(copy.deepcopy(fp), cfg, calib(), progress=False)
    for info in discover_moe_layout(fp).experts():
        for p in ("gate_up_proj", "down_proj"):
            assert torch.equal(cfg.calls[f"{info.fqn}.{p}"][0], info.weight(p).detach().float())


def test_the_refit_target_is_for_fine_grained_layers_by_default():
    """``fp_target_refit=None``: the target over every token on layers with 16 or more experts only (the zoo's
    coarse model got worse with it); on the tiny 4-expert model every projection keeps the candidates' target."""
    assert tm.MoBiEConfig().fp_target_refit is None
    with pytest.raises(ValueError, match="fp_target_refit"):
        tm.MoBiEConfig(fp_target_refit="on")
    cfg = FPHeldRecording(min_expert_tokens=1, fp_target_refit=None)
    tm.quantize_model(copy.deepcopy(tiny_model("qwen3_moe", layers=2)), cfg, calib(16), progress=False)
    assert cfg.calls and all(ctx.fit_weight is None for _, _, ctx in cfg.calls.values())
