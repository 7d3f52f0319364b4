"""``"mobie_sdpa"`` (integrations/attention.py): grouped-query decode steps on the key/value heads give
transformers' ``sdpa`` results; everything else is handed to ``sdpa`` unchanged."""

import copy

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from torchao_mobie.integrations import attention as attn


class _Attn(torch.nn.Module):
    def __init__(self, n_rep):
        super().__init__()
        self.num_key_value_groups, self.is_causal = n_rep, True


def _qkv(b, h, kv, q_len, s, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q_len, d, generator=g), torch.randn(b, kv, s, d, generator=g),
            torch.randn(b, kv, s, d, generator=g))


def _spy_sdpa(monkeypatch):
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **kw):
        shapes.append(tuple(q.shape))
        return real(q, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return shapes


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_step_runs_on_kv_heads_and_matches_sdpa(monkeypatch, mask):
    q, k, v = _qkv(2, 32, 4, 1, 9)
    m = None
    if mask == "bool":
        m = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        m[0, ..., :3] = False
    elif mask == "float":
        m = torch.zeros(2, 1, 1, 9)
        m[1, ..., 5:] = torch.finfo(torch.float32).min
    module = _Attn(8).eval()
    ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.25)
    shapes = _spy_sdpa(monkeypatch)
    got, w = attn.mobie_sdpa_forward(module, q, k, v, m, scaling=0.25)
    assert shapes == [(2, 4, 8, 16)] and w is None  # 8 query rows per KV head, one call
    assert got.shape == ref.shape == (2, 1, 32, 16) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["prefill", "no_gqa", "per_head_mask", "sinks"])
def test_everything_else_goes_to_sdpa_unchanged(monkeypatch, case):
    q, k, v = _qkv(1, 8, 2, 5 if case == "prefill" else 1, 7)
    module, m, kw = _Attn(4), None, {}
    if case == "no_gqa":
        q, k, v = _qkv(1, 4, 4, 1, 7)
        module = _Attn(1)
    if case == "per_head_mask":
        m = torch.zeros(1, 8, 1, 7)
    if case == "sinks":
        kw["s_aux"] = torch.zeros(8)
    assert not attn._packable(module, q, k, m, kw)
    calls = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                        lambda *a, **k: calls.append(a) or ("sdpa", None))
    assert attn.mobie_sdpa_forward(module, q, k, v, m, **kw)[0] == "sdpa" and len(calls) == 1


def test_model_generates_the_same_tokens(micro):
    model, _ = micro
    ref = copy.deepcopy(model).eval()
    fast = copy.deepcopy(model).eval()
    assert ref.config.num_attention_heads > ref.config.num_key_value_heads  # a GQA model
    assert attn.use_decode_attention(fast) == "sdpa" and fast.config._attn_implementation == attn.MOBIE_SDPA
    assert attn.use_decode_attention(fast) is None  # already switched: nothing changes
    assert model.config._attn_implementation == "sdpa"  # the copy, not the model it came from
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outs = [m.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
                for m in (ref, fast)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits), rtol=1e-4, atol=1e-4)
