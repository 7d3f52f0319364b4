"""MoBiEConfig packs by default (issue 17): ``quantize_model`` / ``quantize_`` leave MoBiETensor experts, bit for
bit the fake-quant weights of ``packed=False``, holding only the packed bytes; layouts that cannot be packed are
refused before any weight changes (with an error naming the module)."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import torchao_mobie.storage as S
from torchao_mobie import MoBiEConfig, quantize_, quantize_model
from torchao_mobie.marker import quantization_marker
from torchao_mobie.integrations.transformers import discover_moe_layout


def _held_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, tensor subclasses flattened into their inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_held_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _experts_held_bytes(model) -> int:
    total = 0
    for e in discover_moe_layout(model).experts():
        for t in list(e.module.parameters()) + list(e.module.buffers()):
            total += _held_bytes(t)
    return total


def _stored_bits(b) -> int:
    return b.sign_bits + b.bitmap_bits + b.group_bitmap_bits + b.param_bits + b.backbone_bits


@pytest.fixture(scope="module")
def both(micro):
    """The micro model quantized with MoBiEConfig() (packed) and MoBiEConfig(packed=False), same calibration."""
    calib = torch.randint(0, micro[0].config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    fake, packed = copy.deepcopy(micro[0]), copy.deepcopy(micro[0])
    quantize_model(fake, MoBiEConfig(packed=False), calib, progress=False)
    report = quantize_model(packed, MoBiEConfig(), calib, progress=False)
    return fake, packed, report


def test_quantize_model_packs_by_default(both):
    fake, packed, _ = both
    experts = discover_moe_layout(packed).experts()
    assert experts
    for e in experts:
        for p in ("gate_up_proj", "down_proj"):
            assert isinstance(getattr(e.module, p), S.MoBiETensor), f"{e.fqn}.{p}"
        assert not getattr(e.module, "_mobie_factors", None)  # the stored form is not kept twice
    assert packed.config._experts_implementation == "mobie"
    assert packed.config.quantization_config.quant_method == "mobie"
    assert [m["storage"] for m in quantization_marker(packed)] == ["packed"]
    assert not S.is_packed(fake) and [m["storage"] for m in quantization_marker(fake)] == ["fake-quant"]
    S.pack_model(packed)  # idempotent: existing callers (cli, tutorials, benchmarks) keep working
    assert S.is_packed(packed)


def test_packed_bytes_are_what_the_model_holds(both):
    fake, packed, report = both
    held = _experts_held_bytes(packed)
    mem = S.memory_report(packed)
    accounted = sum(_stored_bits(b) for n, b in report.parameters.items() if ".experts." in n)
    assert held == mem.experts_bytes == (accounted // 8) + mem.experts_padding_bytes
    assert held < 0.2 * _experts_held_bytes(fake)
    # the same bytes as the memory benchmark's default config (data-free: storage does not depend on calibration)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import memory as bench
    finally:
        sys.path.pop(0)
    row = bench.measure("micro-qwen3moe", replace(MoBiEConfig(), glas=False, nges=False, rounds=1, refine=0))
    assert row["experts_packed_MB"] == round(held / 1e6, 4)


def test_packed_is_bit_exact_with_fake_quant(both):
    fake, packed, _ = both
    fq = dict(fake.named_parameters())
    n = 0
    for name, p in packed.named_parameters():
        if isinstance(p, S.MoBiETensor):
            assert torch.equal(p.dequantize(), fq[name]), name
            n += 1
    assert n == 4
    ids = torch.randint(0, fake.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for impl in ("eager", "batched_mm"):  # dequantize the selected experts: the same arithmetic
        fake.set_experts_implementation(impl)
        packed.set_experts_implementation(impl)
        with torch.no_grad():
            assert torch.equal(packed(ids).logits, fake(ids).logits), impl
    packed.set_experts_implementation("mobie")  # ±1 matmuls: another summation order
    with torch.no_grad():
        a, b = packed(ids).logits, fake(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_torchao_flows_pack(micro):
    """quantize_: data-free convert and observe/convert leave MoBiETensor, equal to packed=False's weights."""
    cfg = MoBiEConfig(glas=False, nges=False, rounds=1, refine=0, polish=0)
    ids = torch.randint(0, micro[0].config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    for observe in (False, True):
        out = {}
        for packed in (True, False):
            m = copy.deepcopy(micro[0])
            c = replace(cfg, packed=packed)
            if observe:
                quantize_(m, replace(c, step="observe"))
                with torch.no_grad():
                    m(ids)
            quantize_(m, c)
            out[packed] = m
        assert S.is_packed(out[True]) and not S.is_packed(out[False])
        assert out[True].config._experts_implementation == "mobie"
        assert [e["storage"] for e in quantization_marker(out[True])] == ["packed"]
        fq = dict(out[False].named_parameters())
        for name, p in out[True].named_parameters():
            if isinstance(p, S.MoBiETensor):
                assert torch.equal(p.dequantize(), fq[name]), (observe, name)


def _tiny(family):
    import transformers as tf

    extra = dict(layer_types=["full_attention"]) if family == "gpt_oss" else dict(intermediate_size_mlp=64)
    cfg = tf.AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                                  num_experts_per_tok=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj_bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_transposed_layouts_pack(family):
    """gpt_oss and llama4 store [E, in, out] experts: the packed parameters are transposed views of [E, out, in]
    data, bit for bit packed=False's weights; quantize_ (data-free, torchao) packs them too."""
    model = _tiny(family)
    calib = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    cfg = MoBiEConfig(glas=False, rounds=1, refine=0, polish=0)
    out = {}
    for packed in (True, False):
        out[packed] = copy.deepcopy(model)
        quantize_model(out[packed], replace(cfg, packed=packed), calib, progress=False)
    fq = dict(out[False].named_parameters())
    packed_params = {n: p for n, p in out[True].named_parameters() if isinstance(p, S.MoBiETensor)}
    assert len(packed_params) == 2
    for name, p in packed_params.items():
        assert p.transposed and p.shape == fq[name].shape and torch.equal(p.dequantize(), fq[name]), name
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = out[True](ids).logits, out[False](ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    if family == "gpt_oss":  # transformers' own experts paths on the packed weights
        for impl in ("eager", "batched_mm"):  # dequantize the selected experts: the same arithmetic
            out[True].set_experts_implementation(impl)
            out[False].set_experts_implementation(impl)
            with torch.no_grad():
                assert torch.equal(out[True](ids).logits, out[False](ids).logits), impl
        out[True].set_experts_implementation("grouped_mm")  # the binary factors, no dequantization
        with torch.no_grad():
            assert (out[True](ids).logits - b).abs().max() <= 1e-4 * b.abs().max()
    data_free = copy.deepcopy(model)
    quantize_(data_free, replace(cfg, nges=False))
    assert S.is_packed(data_free) and [e["storage"] for e in quantization_marker(data_free)] == ["packed"]


class _CustomExperts(torch.nn.Module):
    """3D expert weights in a class neither transformers' experts interface nor an adapter knows."""

    def __init__(self, experts):
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj


def test_unknown_layout_refused_before_any_change():
    from torchao_mobie.integrations.transformers import UnsupportedMoELayoutError

    model = _tiny("gpt_oss")
    model.model.layers[0].mlp.experts = _CustomExperts(model.model.layers[0].mlp.experts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    match = r"model\.layers\.0\.mlp\.experts \(_CustomExperts\) has 3D expert weights but lacks the layout flags"
    for packed in (True, False):
        with pytest.raises(UnsupportedMoELayoutError, match=match):
            quantize_model(model, MoBiEConfig(packed=packed, rounds=1, refine=0, polish=0), calib, progress=False)
    with pytest.raises(UnsupportedMoELayoutError, match=match):
        quantize_(model, MoBiEConfig(rounds=1, refine=0, polish=0))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not quantization_marker(model)
