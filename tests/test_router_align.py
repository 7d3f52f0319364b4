"""Router alignment (MoBiEConfig.router_align): each MoE router is refit on the quantized model's own inputs
so that its logits match the full-precision model's on the calibration tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import torchao_mobie as tm
from torchao_mobie.integrations.transformers import discover_moe_layout
from test_pipeline import HSignConfig, calib, changed_params, forward_with_hooks, one_thread, tiny_model  # noqa: F401


@dataclass
class AlignedHSign(HSignConfig):
    router_align: bool = True
    router_align_ridge: float = 0.01


def router_logits(model, ids) -> dict[str, torch.Tensor]:
    """Every router's logits on ``ids``, from its input (an independent capture, not the module's code)."""
    layout = discover_moe_layout(model)
    out, handles = {}, []
    for layer in layout.moe_layers:
        r = layer.moe.router
        handles.append(r.register_forward_pre_hook(
            lambda m, a, fqn=layer.moe.router_fqn: out.setdefault(fqn, []).append(
                a[0].reshape(-1, a[0].shape[-1]).double() @ m.weight.double().T)))
    forward_with_hooks(model, ids, handles)
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_aligned_routers_match_full_precision_logits_better(family):
    fp = tiny_model(family, layers=3)
    ids = calib(16)
    plain, aligned = copy.deepcopy(fp), copy.deepcopy(fp)
    tm.quantize_model(plain, HSignConfig(), ids, progress=False)
    report = tm.quantize_model(aligned, AlignedHSign(), ids, progress=False)

    routers = [layer.moe.router_fqn for layer in discover_moe_layout(fp).moe_layers]
    assert list(report.router_alignment) == routers
    # only the routers change besides the binarized weights, and the experts of the first MoE layer are the same
    assert changed_params(fp, aligned) == set(report.parameters) | {f"{r}.weight" for r in routers[1:]}
    first = dict(fp.named_parameters())[f"{routers[0]}.weight"]
    assert torch.equal(dict(aligned.named_parameters())[f"{routers[0]}.weight"], first)

    ref, got_plain, got = router_logits(fp, ids), router_logits(plain, ids), router_logits(aligned, ids)
    for r in routers[1:]:
        before, after, kept = report.router_alignment[r]
        assert kept  # no held-back sequences here: every refit is kept
        err_plain = float(((got_plain[r] - ref[r]) ** 2).mean())
        err = float(((got[r] - ref[r]) ** 2).mean())
        assert after == pytest.approx(err, rel=1e-3, abs=1e-9)  # the report says what the model does
        assert err < 0.9 * before
        if r == routers[1]:  # the same inputs as without alignment: nothing before it was aligned
            assert before == pytest.approx(err_plain, rel=1e-3)
    assert tuple(report.router_alignment[routers[0]]) == (0.0, 0.0, False)


def test_alignment_off_by_default_and_leaves_routers():
    assert tm.MoBiEConfig().router_align is False
    fp = tiny_model("qwen3_moe", layers=2)
    m = copy.deepcopy(fp)
    report = tm.quantize_model(m, HSignConfig(), calib(), progress=False)
    assert report.router_alignment == {} and changed_params(fp, m) == set(report.parameters)


def test_torchao_flows_refuse_router_align():
    m = tiny_model("qwen3_moe", layers=2)
    before = copy.deepcopy(m)
    with pytest.raises(ValueError, match="router_align=True.*quantize_model"):
        tm.quantize_(m, AlignedHSign())
    assert changed_params(before, m) == set()


@pytest.mark.parametrize("bad", [dict(router_align=1), dict(router_align_ridge=0.0), dict(router_align_ridge=True),
                                 dict(router_align_judge="yes")])
def test_router_align_config_is_validated(bad):
    with pytest.raises(ValueError, match="router_align"):
        tm.MoBiEConfig(**bad)


def test_the_held_back_judge_keeps_a_refit_only_when_the_loss_falls():
    from torchao_mobie.calibration.router_align import align_router
    from torchao_mobie.pipeline.batches import CalibrationBatch

    fp = tiny_model("qwen3_moe", layers=2)
    layer = discover_moe_layout(fp).moe_layers[1]
    ids = calib(8)
    batches = [CalibrationBatch(ids[:4], None), CalibrationBatch(ids[4:], None)]
    hidden, calls = [], []
    def record(module, args, kwargs):
        hidden.append(args[0])
        calls.append((tuple(args[1:]), dict(kwargs)))

    h = layer.module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        fp(input_ids=ids[:4]), fp(input_ids=ids[4:])
    h.remove()
    hidden = [x + 0.3 * torch.randn_like(x) for x in hidden]  # a shifted input stream
    router = layer.moe.router
    targets = [torch.nn.functional.linear(x, router.weight).detach() for x in _router_inputs(layer, fp, ids)]
    W = router.weight.detach().clone()
    for verdict, kept in ((1.0, False), (-1.0, True)):
        router.weight.data.copy_(W)
        seen = []

        def judge():  # the held-back loss: first with the original router, then with the refit
            seen.append(1)
            return torch.tensor([verdict * len(seen)])

        res = align_router(layer, hidden, calls, batches, targets, judge=judge)
        assert res.kept is kept and res.after < res.before and len(seen) == 2
        assert torch.equal(router.weight, W) is (not kept)


def _router_inputs(layer, model, ids):
    xs = []
    h = layer.moe.router.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids[:4]), model(input_ids=ids[4:])
    h.remove()
    return xs
