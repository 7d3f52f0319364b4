"""Many experts (issue 18, Qwen3-Next's 512): CEJD's per-expert work runs in expert chunks with bounded
temporaries, bit-identical to the batched fit; the backbone sums over experts are chunked past the budget."""

from __future__ import annotations

import pytest
import torch

from torchao_mobie.algorithms import backbone_chunked, cejd as C, chunks
from torchao_mobie.algorithms import cejd_backbone


def _problem(E, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, m, n, generator=g)
    X = torch.randn(E, 3 * n, n, generator=g) * torch.rand(E, 1, n, generator=g)
    return W, X.transpose(1, 2) @ X / (3 * n)


def test_expert_chunks_are_aligned_and_within_the_budget():
    for E, per, budget in ((512, 1000, 100_000), (512, 10, 10**9), (40, 10**6, 1), (7, 1, 1)):
        parts = chunks.expert_chunks(E, per, budget)
        assert parts[0].start == 0 and parts[-1].stop == E
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        single = per * chunks.CHUNK_ALIGN > chunks.UNALIGNED_ABOVE * budget  # far past the budget
        for p in parts:
            size = p.stop - p.start
            assert size == 1 if single else p.start % chunks.CHUNK_ALIGN == 0
            assert size * per <= budget or size <= chunks.CHUNK_ALIGN
    assert len(chunks.expert_chunks(512, 1000, 100_000)) == 512 // 96 + 1  # 96 = 100 rounded down to 16s


@pytest.mark.parametrize("side", ["input", "output", "none"])
def test_chunked_factor_fit_is_bit_identical_to_the_batched_one(side, monkeypatch):
    """37 columns: every expert's fp32 matrix starts off a 64-byte boundary, the case where chunks that
    are not multiples of 16 experts changed bits (oneMKL's alignment-dependent paths)."""
    E, m, n = 40, 48, 37
    W, H = _problem(E, m, n)
    A = torch.randn(m, m, generator=torch.Generator().manual_seed(1))
    G = torch.eye(m) + A @ A.t() / m
    kw = dict(side=side, rounds=2, refine=1, polish=1, salient_cols=3, planes=2, G=G, backbone_dtype="int8")
    whole = C.cejd_quantize(W, H, **kw)
    seen = []
    orig = chunks.expert_chunks

    def small(E_, per, budget=None, parts=1):
        out = orig(E_, per, 4 * per)  # one aligned chunk of 16 experts at a time (the floor)
        seen.append([s.stop - s.start for s in out])
        return out

    monkeypatch.setattr(C, "expert_chunks", small)
    chunked = C.cejd_quantize(W, H, **kw)
    assert seen and seen[0] == [16, 16, 8]
    assert torch.equal(whole.weight, chunked.weight)
    for f in ("sign", "row_scale", "col_scale", "sign2", "col_scale2", "sign_x", "col_scale_x"):
        a, b = getattr(whole.factors, f), getattr(chunked.factors, f)
        assert (a is None and b is None) or torch.equal(a, b), f


@pytest.mark.parametrize("side,m,n", [("output", 40, 24), ("input", 24, 40), ("input", 40, 24)])
def test_chunked_backbone_refit_agrees_with_the_batched_one(side, m, n, monkeypatch):
    """Past the budget the backbone's sums over experts are taken by chunks (input side: through the
    factors when the Gram has low rank, m < n): the same solution up to summation order."""
    E = 40
    W, H = _problem(E, m, n, seed=2)
    Q = W + 0.3 * torch.randn(E, m, n, generator=torch.Generator().manual_seed(3))
    bb = C.init_backbone(W, H, side)
    G = None if side == "output" else torch.eye(m) + 0.1 * torch.ones(m, m) / m
    batched = cejd_backbone.refit_backbone(W, H, Q, bb, side, G, cg_iters=30, tol=0.0)
    used = []
    monkeypatch.setattr(cejd_backbone, "chunk_budget", lambda: 1)
    monkeypatch.setattr(backbone_chunked, "expert_chunks",
                        lambda E_, per, budget=None: used.append(1) or chunks.expert_chunks(E_, per, 1))
    chunked = cejd_backbone.refit_backbone(W, H, Q, bb, side, G, cg_iters=30, tol=0.0)
    assert used  # the chunked path ran
    torch.testing.assert_close(chunked, batched, rtol=2e-4, atol=2e-5 * float(batched.abs().max()))


@pytest.mark.parametrize("side", ["auto", "output"])
def test_512_experts_quantize_in_expert_chunks(monkeypatch, side):
    """A Qwen3-Next-like layer (512 experts, top-10) at toy width: it finishes, every factor-metric step
    sees at most one chunk of experts, and the backbone refits take the chunked sums."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from torchao_mobie import MoBiEConfig, quantize_model
    from torchao_mobie.storage import MoBiETensor

    budget = 2 * 2**20
    monkeypatch.setenv("MOBIE_CHUNK_BYTES", str(budget))
    sizes, chunked_sums = [], []
    orig_fm = C.factor_metrics
    monkeypatch.setattr(C, "factor_metrics", lambda W, *a, **k: sizes.append(W.shape) or orig_fm(W, *a, **k))
    orig_out = cejd_backbone.output_side_sums
    monkeypatch.setattr(cejd_backbone, "output_side_sums", lambda *a, **k: chunked_sums.append(1) or orig_out(*a, **k))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=128,
                               moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, num_experts=512, num_experts_per_tok=10,
                               norm_topk_prob=True, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    quantize_model(model, MoBiEConfig(side=side), torch.randint(3, 128, (4, 32),
                                                                generator=torch.Generator().manual_seed(0)),
                   progress=False)
    assert sizes
    for E, m, n in sizes:  # the smallest per-expert estimate (one plane, no left metric) bounds every chunk
        per = chunks.factor_bytes_per_expert(m, n, 1, False)
        assert E <= max(chunks.CHUNK_ALIGN, budget // per // chunks.CHUNK_ALIGN * chunks.CHUNK_ALIGN) < 512
    # the output-side backbone refit takes the chunked sums (the default no longer judges that side)
    assert bool(chunked_sums) == (side == "output")
    assert sum(isinstance(p, MoBiETensor) for p in model.parameters()) == 2


def test_experts_far_past_the_budget_go_one_at_a_time():
    """At Qwen3-30B-A3B's width 16 experts' temporaries pass the budget many times over: single experts."""
    from torchao_mobie.algorithms.chunks import UNALIGNED_ABOVE, expert_chunks, factor_bytes_per_expert

    per = factor_bytes_per_expert(1536, 2048, 1, False)  # gate_up of one expert, ~80 MB
    budget = 256 * 2**20
    assert 16 * per > UNALIGNED_ABOVE * budget
    assert expert_chunks(128, per, budget) == [slice(e, e + 1) for e in range(128)]
    assert expert_chunks(128, per, budget, parts=2) == expert_chunks(128, per, budget)  # same for any workers
    # within the factor the aligned floor of 16 stays (bit-identical to the batch)
    assert expert_chunks(40, budget // 4, budget) == [slice(0, 16), slice(16, 32), slice(32, 40)]
