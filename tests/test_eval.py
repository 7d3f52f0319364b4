import math

import pytest
import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from torchao_mobie.data import eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval import compare_models, log_ppl_gap, perplexity, unigram_perplexity


class _FixedLM(torch.nn.Module):
    """A model whose next-token distribution is known in closed form: softmax(bias), independent of context."""

    def __init__(self, bias, router_logits=None):
        super().__init__()
        self.bias = torch.nn.Parameter(bias.clone())
        self.router = router_logits
        self.config = type("C", (), {"num_experts_per_tok": 2})()

    def forward(self, input_ids, output_router_logits=False):
        logits = self.bias.expand(*input_ids.shape, -1)
        rl = None
        if output_router_logits:
            n = input_ids.numel()
            rl = tuple(r(n) for r in self.router)
        return MoeCausalLMOutputWithPast(logits=logits, router_logits=rl)


def test_perplexity_of_uniform_model_is_vocab_size():
    m = _FixedLM(torch.zeros(37))
    assert perplexity(m, torch.randint(0, 37, (5, 9)), batch_size=2) == pytest.approx(37, rel=1e-6)


def test_perplexity_matches_closed_form():
    bias = torch.randn(11)
    ids = torch.randint(0, 11, (4, 7))
    logp = torch.log_softmax(bias.double(), 0)
    ref = math.exp(-sum(logp[t].item() for row in ids for t in row[1:]) / (4 * 6))  # first token is context only
    assert perplexity(_FixedLM(bias), ids, batch_size=3) == pytest.approx(ref, rel=1e-6)


def test_perplexity_matches_hf_loss_on_zoo_model(micro):
    model, tok = micro
    w = eval_windows(tokenize_corpus(load_text("wikitext2", "test"), tok), 64, max_windows=6)
    with torch.no_grad():  # reference: the model's own shifted-label loss, window by window
        ref = math.exp(sum(model(input_ids=x[None], labels=x[None]).loss.item() for x in w) / len(w))
    assert perplexity(model, w, batch_size=4) == pytest.approx(ref, rel=1e-4)


def test_bad_windows_rejected():
    m = _FixedLM(torch.zeros(5))
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(m, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(m, torch.zeros(2, 1, dtype=torch.long))


def test_log_gap_and_unigram():
    assert log_ppl_gap(math.e * 10, 10) == pytest.approx(1.0)
    assert unigram_perplexity(torch.tensor([0, 1, 2, 3])) == pytest.approx(4.0)
    assert unigram_perplexity(torch.tensor([5, 5, 5])) == pytest.approx(1.0)


def test_compare_models_expert_shift_and_kl():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 4, generator=g)
    fp = _FixedLM(torch.zeros(6), [lambda n: base[:n]] * 2)
    swapped = base.clone()
    swapped[:, [0, 3]] = swapped[:, [3, 0]]  # expert 0 <-> 3 in layer 1 only
    q_bias = torch.tensor([1.0, 0, 0, 0, 0, 0])
    q = _FixedLM(q_bias, [lambda n: base[:n], lambda n: swapped[:n]])
    ids = torch.randint(0, 6, (4, 16))
    r = compare_models(fp, q, ids, batch_size=4)
    top_fp = base.topk(2, -1).indices
    top_q = swapped.topk(2, -1).indices
    kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_fp, top_q)) / (2 * 64)
    assert r.expert_shift.topk_kept[0] == 1.0 and r.expert_shift.top1_changed[0] == 0.0
    assert r.expert_shift.topk_kept[1] == pytest.approx(kept)
    assert r.expert_shift.top1_changed[1] == pytest.approx((top_fp[:, 0] != top_q[:, 0]).float().mean().item())
    p = torch.full((6,), 1 / 6)
    qd = torch.softmax(q_bias, 0)
    assert r.kl == pytest.approx((p * (p.log() - qd.log())).sum().item(), rel=1e-5)
    assert r.ppl_fp == pytest.approx(6.0) and r.gap > 0


def test_compare_identical_models(micro):
    model, tok = micro
    w = eval_windows(tokenize_corpus(load_text("ptb", "test"), tok), 32, max_windows=4)
    r = compare_models(model, model, w)
    assert r.ppl_fp == r.ppl_q and r.kl == pytest.approx(0, abs=1e-6)
    assert r.expert_shift.mean_topk_kept == 1.0 and len(r.expert_shift.topk_kept) == model.config.num_hidden_layers


def test_expert_shift_uses_the_experts_each_router_chose():
    """Group-limited sigmoid routing (DeepSeek-V3) does not pick the top-k logits; agreement must count the
    experts it did pick. A softmax top-k router (Qwen3-MoE) picks exactly the top-k logits."""
    from transformers import AutoModelForCausalLM

    from torchao_mobie.eval.metrics import _Assignments, _router_topk
    from torchao_mobie.zoo import HELDOUT

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    for name, differs in (("heldout-deepseekv3-9m", True), ("heldout-qwen3moe-12m", False)):
        cfg = HELDOUT[name].build_config()
        cfg.num_hidden_layers, cfg.vocab_size = 3, 512
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        for m in model.modules():  # random routers (from_config zeros the DeepSeek router)
            if hasattr(m, "e_score_correction_bias"):
                torch.nn.init.normal_(m.weight)
        with torch.no_grad(), _Assignments(model) as rec:
            out = model(input_ids=ids, output_router_logits=True)
            chosen = rec.take(out.router_logits, cfg.num_experts_per_tok)
        top = _router_topk(out.router_logits, cfg.num_experts_per_tok)
        assert len(chosen) == len(top) == len(rec.routers)
        same = all(torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(chosen, top))
        assert same != differs, name
        ours = [h for r in rec.routers for h in r._forward_hooks.values() if "_Assignments" in h.__qualname__]
        assert not ours  # removed on exit (transformers' own capturing hook stays)
        r = compare_models(model, model, ids[:, :16], batch_size=2)
        assert r.expert_shift.mean_topk_kept == 1.0


def test_methods_benchmark_merges_parallel_runs_and_refuses_duplicate_rows(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import methods as bench
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)

    def row(method, seed, gap):
        return {"model": "m", "method": method, "seed": seed, "calib": "wikitext2+ptb", "wikitext2_gap": gap,
                "ptb_gap": 2 * gap, "paper_bits": 1.1, "all_inclusive_bits": 1.5}

    (tmp_path / "a.json").write_text(json.dumps({"command": "run a", "rows": [row("billm", 0, 0.1), row("mobie", 0, 0.02)]}))
    (tmp_path / "b.json").write_text(json.dumps({"command": "run b", "rows": [row("mobie", 1, 0.04)]}))
    bench.main(["--name", "a", "--report-only", "--merge", "b"])
    merged = json.loads((tmp_path / "a.json").read_text())
    assert merged["commands"][:2] == ["run a", "run b"] and "--merge b" in merged["commands"][2]
    assert len(merged["rows"]) == 3
    mobie = next(s for s in merged["summary"] if s["method"] == "mobie")
    assert mobie["seeds"] == 2 and mobie["wikitext2_gap"] == 0.03 and mobie["ptb_gap_spread"] == "0.0400-0.0800"
    assert mobie["gap_vs_billm"] == 0.3 and "run a ; run b" in (tmp_path / "a.md").read_text()
    with pytest.raises(SystemExit):  # b's rows are in a now
        bench.main(["--name", "a", "--report-only", "--merge", "b"])
    assert len(json.loads((tmp_path / "a.json").read_text())["rows"]) == 3


def test_gap_plot_draws_a_budget_sweep_as_one_curve(tmp_path):
    from torchao_mobie.eval.plots import _without_max_bits, plot_gap_vs_bits

    assert _without_max_bits("mobie:max_bits=2.0") == "mobie"
    assert _without_max_bits("mobie:glas=False,max_bits=3.0") == "mobie:glas=False"
    assert _without_max_bits("hbllm:haar=col") == "hbllm:haar=col" and _without_max_bits("billm") == "billm"
    rows = [dict(model="m", method=f"mobie:max_bits={b}", all_inclusive_bits=b, wikitext2_gap=0.04 / b)
            for b in (2.0, 1.5, 3.0)] + [dict(model="m", method="billm", all_inclusive_bits=3.0, wikitext2_gap=0.1)]
    path = plot_gap_vs_bits(rows, tmp_path / "f.png")
    assert path.exists() and path.stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close("all")
