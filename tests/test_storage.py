"""Packed 1-bit storage (MoBiETensor): packing, exact dequantization, every experts implementation,
memory = bit accounting, safetensors + HF round trips, corrupted checkpoints, torch.compile.

Tolerances (fp32 models): max |Δ logits| <= 1e-4 · max |logits| against the fake-quant model for every
experts implementation. eager / batched_mm run on dequantized experts (float rounding only); grouped_mm
and the fused "mobie" path compute ``row ⊙ (B (col ⊙ x))`` on unpacked ±1 signs and apply the backbone
separately, another summation order (measured ~1e-6 relative). In bf16 the fused path computes in fp32
and differs from the bf16 fake-quant model by bf16 rounding (a few % of max |logit|, the same size as
bf16-vs-fp32 of the fake-quant model itself); not tested here. Compiled (inductor) vs eager: 1e-5.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

import torchao_mobie.storage as S
from torchao_mobie.algorithms import cejd as C

IMPLS = ["eager", "batched_mm", "grouped_mm", "mobie"]
RTOL_LOGITS = 1e-4  # max |Δ logits| / max |logits|


def _binarize(model, *, salient=2, backbone_dtype="int8", rounds=1):
    """Data-free CEJD on every experts projection: writes the fake-quant weight (as MoBiE does) and
    returns ``{param fqn: (factors, BitBudget)}``."""
    res = S.binarize_experts_data_free(model, lambda W, H, name, p: C.cejd_quantize(
        W, H, backbone_dtype=backbone_dtype, rounds=rounds, salient_cols=salient))
    return {k: (r.factors, r.bits) for k, r in res.items()}


def _logits(model, ids, impl):
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model(ids).logits.float()


def _close(a, b, rtol=RTOL_LOGITS):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    assert err <= rtol, f"relative logits error {err:.3g} > {rtol}"


@pytest.fixture(scope="module")
def packed_micro(micro):
    model, _ = micro
    fq = copy.deepcopy(model)
    parts = _binarize(fq)
    pm = copy.deepcopy(fq)
    S.pack_model(pm, {k: v[0] for k, v in parts.items()})
    ids = torch.randint(0, fq.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return fq, pm, parts, ids


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100])
def test_pack_unpack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    s = torch.where(torch.rand(3, 4, n, generator=g) < 0.5, -1.0, 1.0)
    w = S.pack_signs(s)
    assert w.dtype == torch.int32 and w.shape == (3, 4, S.packed_length(n))
    assert torch.equal(S.unpack_signs(w, n), s)
    # padding bits are clear, so nothing outside the logical length is ever set
    full = S.unpack_bits(w, S.packed_length(n) * 32)
    assert int(full[..., n:].sum()) == 0


def test_pack_word_layout_lsb_first():
    s = -torch.ones(64)
    s[0] = 1
    s[31] = 1
    s[33] = 1
    w = S.pack_signs(s)
    assert w[0].item() == 1 - 2 ** 31  # bits 0 and 31 (two's complement)
    assert w[1].item() == 2
    with pytest.raises(ValueError):
        S.unpack_signs(w, 65)


# ------------------------------------------------------------------------------------------------
# dequantize: bit-exact vs the fake-quant weight
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,side,salient,bdt", [
    ((4, 24, 40), "output", 0, "int8"),
    ((4, 40, 24), "input", 3, "bfloat16"),
    ((3, 33, 17), "input", 2, "float32"),
    ((3, 16, 50), "none", 4, "int8"),
    ((2, 32, 64), "output", 0, "bfloat16"),
])
def test_dequantize_bit_exact(shape, side, salient, bdt):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g)
    E, m, n = shape
    res = C.cejd_quantize(W, torch.eye(n).repeat(E, 1, 1), side=side, backbone_dtype=bdt, rounds=1,
                          salient_cols=salient)
    for dtype in (torch.float32, torch.bfloat16):
        t = S.MoBiETensor.from_parts(res.factors, dtype=dtype)
        assert t.shape == W.shape and t.dtype == dtype
        assert torch.equal(t.dequantize(torch.float32), res.weight)  # same fp32 values
        assert torch.equal(t.dequantize(), res.weight.to(dtype))
    # the dict form of the public boundary: a list of per-expert dicts with fp16 scales (no codes)
    f = res.factors
    bb = None if f.backbone is None else {"blocks": f.backbone.blocks, "scale": f.backbone.scale}
    per = [{"side": f.side, "backbone": bb, "sign": f.sign[e], "row_scale": f.row_scale[e],
            "col_scale": f.col_scale[e], "sign2": None if f.sign2 is None else f.sign2[e],
            "col_scale2": None if f.col_scale2 is None else f.col_scale2[e]} for e in range(E)]
    assert torch.equal(S.MoBiETensor.from_parts(per, dtype=torch.float32).dequantize(), res.weight)
    # per-expert factors joined again pack to the same tensor
    joined = type(f).cat([f.experts(e) for e in range(E)])
    assert torch.equal(S.MoBiETensor.from_parts(joined, dtype=torch.float32).qdata, S.MoBiETensor.from_parts(f).qdata)
    # expert selection (eager path) dequantizes only the selected experts
    t = S.MoBiETensor.from_parts(res.factors, dtype=torch.float32)
    torch.testing.assert_close(t[E - 1], res.weight[E - 1], rtol=1e-6, atol=1e-6)
    sel = torch.tensor([E - 1, 0, E - 1])
    torch.testing.assert_close(t[sel], res.weight[sel], rtol=1e-6, atol=1e-6)


def test_from_parts_validation():
    W = torch.randn(2, 8, 8)
    res = C.cejd_quantize(W, torch.eye(8).repeat(2, 1, 1), side="output", rounds=1)
    f = res.factors
    parts = {"side": f.side, "sign": f.sign, "row_scale": f.row_scale, "col_scale": f.col_scale,
             "backbone": {"blocks": f.backbone.blocks, "scale": f.backbone.scale}}
    S.MoBiETensor.from_parts(parts)  # the dict form packs
    with pytest.raises(ValueError, match="row_scale"):
        S.MoBiETensor.from_parts(dict(parts, row_scale=f.row_scale[:, :4]))
    with pytest.raises(ValueError, match="backbone"):
        S.MoBiETensor.from_parts(dict(parts, backbone=None))
    with pytest.raises(ValueError, match="row_scale .* does not match its 8-bit codes"):
        S.MoBiETensor.from_parts(dataclasses.replace(f, row_scale=f.row_scale * 2))
    with pytest.raises(TypeError, match="CEJDFactors, a dict"):
        S.MoBiETensor.from_parts("sign")


def test_mobie_config_parts_pack():
    """MoBiEConfig.quantize_experts' representation packs bit-exactly."""
    from torchao_mobie.config import MoBiEConfig

    g = torch.Generator().manual_seed(3)
    for shape in ((4, 64, 32), (4, 32, 64), (4, 32, 16)):
        W = torch.randn(*shape, generator=g)
        res = MoBiEConfig(glas=False, nges=False, rounds=1, refine=0).quantize_experts(
            W, torch.eye(shape[2]).repeat(shape[0], 1, 1))
        t = S.MoBiETensor.from_parts(res.factors, dtype=torch.float32)
        assert torch.equal(t.dequantize(), res.weight.float())
        assert t.storage_bytes() * 8 == res.bits.stored_bits + t.padding_bits()
        assert t.padding_bits() == (0 if shape[2] % 32 == 0 else t.padding_bits())


def test_quantize_then_pack_end_to_end(micro):
    from torchao_mobie import quantize_
    from torchao_mobie.config import MoBiEConfig

    model = copy.deepcopy(micro[0])
    quantize_(model, MoBiEConfig(glas=False, nges=False, rounds=1, refine=0, packed=False))  # fake-quant
    assert not S.is_packed(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids, "eager")
    S.pack_model(model)  # checks dequantize() == fake-quant weight bit for bit
    assert S.is_packed(model)
    _close(_logits(model, ids, "mobie"), ref)


# ------------------------------------------------------------------------------------------------
# experts implementations
# ------------------------------------------------------------------------------------------------


def test_packed_params_and_impls_micro(packed_micro):
    fq, pm, _, ids = packed_micro
    ex = pm.model.layers[0].mlp.experts
    assert isinstance(ex.gate_up_proj, S.MoBiETensor) and isinstance(ex.down_proj, S.MoBiETensor)
    ref = _logits(fq, ids, "eager")
    for impl in IMPLS:
        _close(_logits(pm, ids, impl), ref)


def _tiny(family: str, hidden: int, inter: int):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, moe_intermediate_size=inter, shared_expert_intermediate_size=32,
                                num_experts=6, num_experts_per_tok=2, intermediate_size=48)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=inter, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = tf.OlmoeConfig(**common, intermediate_size=inter, num_experts=8, num_experts_per_tok=3)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,hidden,inter", [
    ("qwen2_moe", 32, 48),  # gate_up input-side, down output-side backbone
    ("mixtral", 64, 16),  # gate_up output-side, down input-side
    ("olmoe", 40, 24),  # dims not multiples of 32 (padding)
])
def test_impls_tiny_families(family, hidden, inter):
    model = _tiny(family, hidden, inter)
    parts = _binarize(model, salient=2)
    sides = {k.rsplit(".", 1)[1] + ":" + v[0].side for k, v in parts.items()}
    pm = copy.deepcopy(model)
    S.pack_model(pm, {k: v[0] for k, v in parts.items()})
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids, "eager")
    for impl in IMPLS:
        _close(_logits(pm, ids, impl), ref)
    assert sides, sides


def test_mobie_skips_unused_experts(packed_micro, monkeypatch):
    """The fused path only unpacks the experts that received tokens."""
    _, pm, _, _ = packed_micro
    ex = pm.model.layers[0].mlp.experts
    seen = []
    real = S.unpack_signs

    def spy(words, n, dtype=torch.float32):
        seen.append(tuple(words.shape))
        return real(words, n, dtype)

    import torchao_mobie.kernels.reference as ref

    monkeypatch.setattr(ref, "unpack_signs", spy)
    x = torch.randn(3, ex.hidden_dim)
    idx = torch.tensor([[1, 4], [4, 1], [1, 4]])
    w = torch.full((3, 2), 0.5)
    ex.config._experts_implementation = "mobie"
    from torchao_mobie.kernels import use_backend

    with use_backend("reference"):  # the CPU kernels read only the selected experts' words by construction
        y = ex(x, idx, w)
    assert y.shape == x.shape
    # 2 experts x 2 projections x 2 sign planes, each one expert's [rows, words] (never all E experts)
    assert len(seen) == 8 and all(len(s) == 2 for s in seen), seen


def test_grouped_mm_runs_packed(packed_micro, monkeypatch):
    """transformers' grouped_mm path: transpose gives a lazy [E, in, out] view and _grouped_mm runs the
    binary factors (no dequantization); rows past offs[-1] (EP sentinels) come out zero."""
    fq, pm, _, ids = packed_micro
    calls = []
    real = S.MoBiETensor.dequantize
    monkeypatch.setattr(S.MoBiETensor, "dequantize", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    out = _logits(pm, ids, "grouped_mm")
    assert not calls
    _close(out, _logits(fq, ids, "eager"))
    w = pm.model.layers[0].mlp.experts.down_proj
    wt = w.transpose(-2, -1)
    assert isinstance(wt, S.MoBiETensor) and wt.transposed and wt.shape == (w.shape[0], w.shape[2], w.shape[1])
    monkeypatch.setattr(S.MoBiETensor, "dequantize", real)
    x = torch.randn(5, w.shape[2])
    offs = torch.tensor([0, 2, 2, 4, 4, 4, 4, 4], dtype=torch.int32)  # 4 rows owned, row 4 is a sentinel
    y = torch._grouped_mm(x, wt, offs)
    ref = torch.stack([x[0] @ real(w)[1].t(), x[1] @ real(w)[1].t(), x[2] @ real(w)[3].t(), x[3] @ real(w)[3].t()])
    torch.testing.assert_close(y[:4], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[4], torch.zeros_like(y[4]))


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


def test_memory_equals_bit_accounting(packed_micro):
    fq, pm, parts, _ = packed_micro
    total = 0
    for fqn, (_, bits) in parts.items():
        mod, p = fqn.rsplit(".", 1)
        t = getattr(pm.get_submodule(mod), p)
        assert t.padding_bits() == 0  # micro dims are multiples of 32
        assert t.storage_bytes() * 8 == bits.stored_bits == t.bit_budget().stored_bits
        total += bits.stored_bits
    r = S.memory_report(pm)
    assert r.experts_bytes * 8 == total == r.experts_budget_bytes * 8
    assert r.packed_parameters == len(parts)
    assert r.experts_ratio < 0.2
    r0 = S.memory_report(fq)  # fake-quant: experts stored at full width
    assert r0.experts_bytes == 4 * r0.experts_weights and r0.packed_parameters == 0
    assert r.model_bytes == r0.model_bytes - r0.experts_bytes + r.experts_bytes


def test_memory_padding_reported():
    model = _tiny("olmoe", 40, 24)
    parts = _binarize(model, salient=2)
    S.pack_model(model, {k: v[0] for k, v in parts.items()})
    r = S.memory_report(model)
    assert r.experts_padding_bytes > 0
    assert r.experts_bytes == r.experts_budget_bytes + r.experts_padding_bytes


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def test_safetensors_roundtrip(packed_micro, tmp_path):
    _, pm, _, ids = packed_micro
    S.save_quantized(pm, str(tmp_path))
    m2 = S.load_quantized(str(tmp_path))
    sd1, sd2 = pm.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k, v in sd1.items():
        w = sd2[k]
        if isinstance(v, S.MoBiETensor):
            assert isinstance(w, S.MoBiETensor) and w.side == v.side and w.dtype == v.dtype
            for name, a in v.stored_tensors().items():
                assert torch.equal(a, getattr(w, name)), (k, name)
        else:
            assert torch.equal(v, w), k
    assert torch.equal(_logits(pm, ids, "mobie"), _logits(m2, ids, "mobie"))


def _corrupt_data_byte(path, key):
    from safetensors import safe_open

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    start = header[key]["data_offsets"][0] + 8 + header_len
    with open(path, "r+b") as f:
        f.seek(start)
        b = f.read(1)
        f.seek(start)
        f.write(bytes([b[0] ^ 0x5A]))
    with safe_open(path, framework="pt") as f:
        assert key in f.keys()


def test_corrupted_truncated_and_version(packed_micro, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, pm, _, _ = packed_micro
    S.save_quantized(pm, str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    raw = open(path, "rb").read()
    key = "model.layers.1.mlp.experts._down_proj_qdata"

    _corrupt_data_byte(path, key)
    with pytest.raises(S.MoBiECheckpointError, match=f"{path}.*{key}.*corrupted"):
        S.load_quantized(str(tmp_path))

    open(path, "wb").write(raw[: len(raw) - 100])
    with pytest.raises(S.MoBiECheckpointError, match="model.safetensors.*truncated"):
        S.load_quantized(str(tmp_path))

    open(path, "wb").write(raw)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != key}, path, metadata=meta)
    with pytest.raises(S.MoBiECheckpointError, match=f"{path}.*{key}.*missing"):
        S.load_quantized(str(tmp_path))

    save_file(tensors, path, metadata=dict(meta, mobie_format_version="99"))
    with pytest.raises(S.MoBiECheckpointError, match="version 99"):
        S.load_quantized(str(tmp_path))


def test_hf_save_pretrained_roundtrip(packed_micro, tmp_path):
    from transformers import AutoModelForCausalLM

    _, pm, _, ids = packed_micro
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "mobie"
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ex = m2.model.layers[1].mlp.experts
    assert isinstance(ex.down_proj, S.MoBiETensor) and m2.config._experts_implementation == "mobie"
    ref = _logits(pm, ids, "mobie")
    assert torch.equal(_logits(m2, ids, "mobie"), ref)
    _close(_logits(m2, ids, "grouped_mm"), ref)
    # model.dequantize(): back to the fake-quant weights, bit for bit
    fq = packed_micro[0]
    m2.dequantize()
    assert not S.is_packed(m2) and not getattr(m2, "is_quantized", False)
    for fqn in packed_micro[2]:
        mod, p = fqn.rsplit(".", 1)
        assert torch.equal(getattr(m2.get_submodule(mod), p), getattr(fq.get_submodule(mod), p))
    # sharded checkpoint (the metadata of every shard lists all checksums)
    pm.save_pretrained(str(tmp_path / "sharded"), max_shard_size="300KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")), ids, "mobie"), ref)
    # a corrupted tensor is reported by name through from_pretrained too
    key = "model.layers.0.mlp.experts._gate_up_proj_row_scale"
    _corrupt_data_byte(str(tmp_path / "model.safetensors"), key)
    with pytest.raises(S.MoBiECheckpointError, match=key):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def test_compile_experts_fullgraph(packed_micro):
    _, pm, _, _ = packed_micro
    ex = pm.model.layers[0].mlp.experts
    ex.config._experts_implementation = "mobie"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, ex.hidden_dim, generator=g)
    idx = torch.randint(0, ex.num_experts, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    torch._dynamo.reset()
    cf = torch.compile(ex, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(cf(x, idx, w), ex(x, idx, w), rtol=1e-5, atol=1e-5)


def test_compile_model_inductor(packed_micro):
    _, pm, _, ids = packed_micro
    pm.set_experts_implementation("mobie")
    torch._dynamo.reset()
    cm = torch.compile(pm)
    ref = _logits(pm, ids, "mobie")
    with torch.no_grad():
        out = cm(ids).logits.float()
    _close(out, ref, 1e-5)


@pytest.mark.parametrize("name,target", [("qwen3moe-32e", 0.12), ("mixtral-8e", 0.14)])
def test_zoo_memory_target(name, target):
    """Packed experts <= 12% of bf16 on the fine-grained zoo model, <= 14% on the coarse one, with
    MoBiEConfig's default storage settings."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    from torchao_mobie.config import MoBiEConfig
    from torchao_mobie.zoo import available

    if name not in available():
        pytest.skip(f"{name} checkpoint not present")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import memory as bench
    finally:
        sys.path.pop(0)
    cfg = replace(MoBiEConfig(), glas=False, nges=False, rounds=1, refine=0)
    row = bench.measure(name, cfg)
    assert row["experts_ratio"] <= target, row
    assert row["model_ratio"] < 0.5, row


@pytest.mark.parametrize("has_gate,has_bias", [(True, True), (False, False), (False, True)])
def test_mobie_impl_bias_and_ungated(has_gate, has_bias):
    """Synthetic experts modules with biases / without gate: "mobie" == batched_mm on the same packed weights."""
    from types import SimpleNamespace

    from torch import nn
    from transformers.integrations.moe import use_experts_implementation

    E, H, Inter = 4, 32, 48

    @use_experts_implementation(has_bias=has_bias, has_gate=has_gate)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            up = "gate_up_proj" if has_gate else "up_proj"
            m = 2 * Inter if has_gate else Inter
            g = torch.Generator().manual_seed(0)
            setattr(self, up, nn.Parameter(torch.randn(E, m, H, generator=g)))
            self.down_proj = nn.Parameter(torch.randn(E, H, Inter, generator=g))
            if has_bias:
                setattr(self, f"{up}_bias", nn.Parameter(torch.randn(E, m, generator=g)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
            self.act_fn = nn.functional.silu

    cfg = SimpleNamespace(_experts_implementation="batched_mm")
    ex = Experts(cfg)
    for name in ("gate_up_proj" if has_gate else "up_proj", "down_proj"):
        W = getattr(ex, name).detach()
        res = C.cejd_quantize(W, torch.eye(W.shape[2]).repeat(E, 1, 1), rounds=1, salient_cols=2)
        setattr(ex, name, nn.Parameter(S.MoBiETensor.from_parts(res.factors, dtype=torch.float32), requires_grad=False))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, H, generator=g)
    idx = torch.randint(0, E, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        ref = ex(x, idx, w)
        cfg._experts_implementation = "mobie"
        out = ex(x, idx, w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_random_parts_with_mean():
    """A representation built by hand (random signs, scales, mean, bf16 output-side backbone)."""
    g = torch.Generator().manual_seed(5)
    E, m, n = 3, 40, 70
    sign = torch.where(torch.rand(E, m, n, generator=g) < 0.5, -1, 1).to(torch.int8)
    parts = {"side": "output", "sign": sign, "row_scale": torch.rand(E, m, generator=g).half(),
             "col_scale": torch.rand(E, n, generator=g).half(), "mean": torch.randn(E, m, generator=g).half(),
             "backbone": {"blocks": torch.randn(2, m // 2, m // 2, generator=g).bfloat16(), "dtype": "bfloat16",
                          "scale": None}}
    t = S.MoBiETensor.from_parts(parts, dtype=torch.float32)
    Q = parts["row_scale"].float()[:, :, None] * (sign.float() * parts["col_scale"].float()[:, None, :])
    Q = Q + parts["mean"].float()[:, :, None]
    M = torch.block_diag(*parts["backbone"]["blocks"].float().unbind(0))
    assert torch.equal(t.dequantize(), M @ Q)
    x = torch.randn(9, n, generator=g)
    ids = torch.randint(0, E, (9,), generator=g)
    y = t.backbone_output(t.factor_mm(x, ids))
    ref = torch.stack([t.dequantize()[e] @ xi for e, xi in zip(ids.tolist(), x)])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert t.padding_bits() == E * m * (3 * 32 - n)
