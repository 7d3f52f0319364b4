"""Passes quantize_model shares instead of repeating (quantization time, issue 16): the down_proj stage replays
the experts calls its gate_up stage saw instead of running the layer again, and the full-precision target takes
the expert inputs layer-wise GLAS recomputed instead of running each layer once more. Both must leave every
binarized byte as the unshared passes do, and must really skip the forwards."""

from __future__ import annotations

import copy

import pytest
import torch

import torchao_mobie as tm
from torchao_mobie.calibration.fp_shadow import FPShadow
from torchao_mobie.pipeline import sequential
from test_pipeline import calib, one_thread, tiny_model  # noqa: F401


def _quantize(model, monkeypatch, *, replay: bool, recorded: bool, **cfg) -> tuple[dict, int]:
    """The binarized state dict and the number of decoder-layer forwards of one quantize_model run."""
    with monkeypatch.context() as m:
        if not replay:
            run = sequential._run_stage
            m.setattr(sequential, "_run_stage", lambda *a, **k: run(*a, **{**k, "replay": None}))
        if not recorded:
            m.setattr(sequential, "FPShadow", lambda hidden, output_of, rec=None: FPShadow(hidden, output_of))
        calls = [0]
        layers = model.model.layers
        handles = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for layer in layers]
        try:
            tm.quantize_model(model, tm.MoBiEConfig(packed=False, **cfg), calib(n=8, seqlen=16), progress=False,
                              batch_size=4)
        finally:
            for h in handles:
                h.remove()
    return {k: v.clone() for k, v in model.state_dict().items()}, calls[0]


def _n_batches() -> int:
    """quantize_model's calibration batches (the held-back split makes more than 8 rows / 4)."""
    batches = sequential.calibration_batches(calib(n=8, seqlen=16), 4, torch.device("cpu"))
    return len(sequential.hold_back(batches, sequential.CalibrationBatch))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_shared_passes_binarize_the_same_bytes_with_fewer_forwards(family, monkeypatch):
    fp = tiny_model(family, layers=2)
    base, n_base = _quantize(copy.deepcopy(fp), monkeypatch, replay=False, recorded=False)
    for replay, recorded in [(True, False), (False, True), (True, True)]:
        got, n = _quantize(copy.deepcopy(fp), monkeypatch, replay=replay, recorded=recorded)
        assert base.keys() == got.keys()
        diff = [k for k in base if not torch.equal(base[k], got[k])]
        assert not diff, (replay, recorded, diff[:4])
        moe_layers = sum(1 for layer in fp.model.layers if hasattr(layer.mlp, "experts"))
        # per calibration batch: the replay saves a forward of every MoE layer, the recorded inputs one of every
        # layer (the shadow also carried its hidden states through dense layers)
        saved = _n_batches() * (moe_layers * int(replay) + len(fp.model.layers) * int(recorded))
        assert n_base - n == saved, (replay, recorded, n_base, n)


def test_the_shadow_runs_its_layers_when_glas_covers_part_of_the_batches(monkeypatch):
    """``glas_samples`` below the calibration set: the recomputation misses batches, so the shadow runs."""
    fp = tiny_model("qwen3_moe", layers=2)
    base, n_base = _quantize(copy.deepcopy(fp), monkeypatch, replay=True, recorded=False, glas_samples=4)
    got, n = _quantize(copy.deepcopy(fp), monkeypatch, replay=True, recorded=True, glas_samples=4)
    assert n == n_base and all(torch.equal(base[k], got[k]) for k in base)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_glas_collector_shares_the_plain_collectors_statistics_bit_for_bit(family, monkeypatch):
    """GLAS's collector takes the layer sums, the starved experts' down inputs and the per-expert down inputs
    from the plain collector of the same calls: same bytes, and down_proj's inputs computed once per call."""
    from torchao_mobie.calibration.experts import ExpertStatsCollector
    from torchao_mobie.integrations.transformers import ExpertsInfo

    fp = tiny_model(family, layers=2)
    runs = {}
    for share in (False, True):
        with monkeypatch.context() as m:
            if not share:
                m.setattr(ExpertStatsCollector, "share_from", lambda self, source: self)
            calls = [0]
            down_input = ExpertsInfo.down_input

            def counted(self, *a, **k):
                calls[0] += 1
                return down_input(self, *a, **k)

            m.setattr(ExpertsInfo, "down_input", counted)
            got, _ = _quantize(copy.deepcopy(fp), monkeypatch, replay=True, recorded=True)
        runs[share] = (got, calls[0])
    (base, n_base), (got, n) = runs[False], runs[True]
    diff = [k for k in base if not torch.equal(base[k], got[k])]
    assert not diff, diff[:4]
    assert n < n_base, (n, n_base)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_heldback_judge_is_each_held_back_sequences_mean_nll_in_the_model(family):
    """The layout judge's per-sequence loss (computed over contiguous rows for speed) is the mean next-token NLL
    of each held-back sequence that the whole model gives."""
    import torch.nn.functional as F

    from torchao_mobie.integrations.transformers import discover_moe_layout

    model = tiny_model(family, layers=2).eval()
    ids = calib(n=8, seqlen=16)
    batches = sequential.hold_back(sequential.calibration_batches(ids, 4, torch.device("cpu")),
                                   sequential.CalibrationBatch)
    layout = discover_moe_layout(model)
    with torch.no_grad():
        hidden, calls = sequential.capture_layer_inputs(model, layout, batches)
        judge = sequential._heldback_loss(model, layout, calls, batches)
        got = judge.per_sequence(0, hidden)
        held = torch.cat([b.input_ids for b in batches if b.heldback])
        logits = model(input_ids=held, use_cache=False).logits.float()
        want = F.cross_entropy(logits[:, :-1].transpose(1, 2), held[:, 1:], reduction="none").double().mean(1)
    assert got.shape == (ids.shape[0] // 4,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_share_from_refuses_a_collector_that_would_starve_other_experts():
    from torchao_mobie.calibration.experts import ExpertStatsCollector
    from torchao_mobie.integrations.transformers import discover_moe_layout

    info = discover_moe_layout(tiny_model("qwen3_moe", layers=1)).layers[0].moe.experts
    plain = ExpertStatsCollector(info, ("down_proj",), min_expert_tokens=16)
    with pytest.raises(ValueError, match="min_expert_tokens"):
        ExpertStatsCollector(info, ("down_proj",), min_expert_tokens=8).share_from(plain)
    assert ExpertStatsCollector(info, ("down_proj",), min_expert_tokens=16).share_from(plain).source is plain


@pytest.mark.parametrize("family,cfg", [("qwen3_moe", {}), ("mixtral", {}), ("deepseek_v3", {}),
                                        ("qwen3_moe", dict(router_align=True, router_align_judge=True))])
def test_next_layer_inputs_replay_the_recorded_attention_bit_for_bit(family, cfg, monkeypatch):
    """The re-run that makes the next layer's inputs, and the held-back judge's run of the layer it judges, take
    the attention outputs the gate_up stage recorded: the same bytes as running attention again, and one
    attention forward fewer per MoE layer and batch, and per judged candidate and held-back batch."""
    import contextlib

    fp = tiny_model(family, layers=2)
    attn_cls = type(fp.model.layers[0].self_attn)
    runs = {}
    for replayed in (False, True):
        model = copy.deepcopy(fp)
        n = [0]
        forward = attn_cls.forward

        def counted(self, *args, **kwargs):
            n[0] += 1
            return forward(self, *args, **kwargs)

        judged = [0]
        judge = sequential.HeldbackLoss.judge

        def counting(self, *args, **kwargs):
            f = judge(self, *args, **kwargs)
            return None if f is None else (lambda W: (judged.__setitem__(0, judged[0] + 1), f(W))[1])

        with monkeypatch.context() as m:
            m.setattr(attn_cls, "forward", counted)
            m.setattr(sequential.HeldbackLoss, "judge", counting)
            if not replayed:
                m.setattr(sequential, "attention_replayed", lambda *a: contextlib.nullcontext())
            tm.quantize_model(model, tm.MoBiEConfig(packed=False, **cfg), calib(n=8, seqlen=16), progress=False,
                              batch_size=4)
        runs[replayed] = ({k: v.clone() for k, v in model.state_dict().items()}, n[0], judged[0])
        assert "forward" not in vars(model.model.layers[0].self_attn)  # the module is left as it was
    (base, n_base, j_base), (got, n_got, j_got) = runs[False], runs[True]
    assert not [k for k in base if not torch.equal(base[k], got[k])]
    moe_layers = sum(1 for layer in fp.model.layers if hasattr(layer.mlp, "experts"))
    batches = sequential.hold_back(sequential.calibration_batches(calib(n=8, seqlen=16), 4, torch.device("cpu")),
                                   sequential.CalibrationBatch)
    held = sum(1 for b in batches if b.heldback)
    assert j_base == j_got and held and j_got, (j_base, j_got, held)
    saved = len(batches) * moe_layers + j_got * held
    if cfg:  # router alignment (and its judge) replay it too: its runs up to the router
        assert n_base - n_got > saved, (n_base, n_got, saved)
    else:
        assert moe_layers and n_base - n_got == saved, (n_base, n_got, j_got)
