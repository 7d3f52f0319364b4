"""Further full binary planes (``planes > 1``): fit, exact packing, kernels' reference, checkpoints."""

import copy

import pytest
import torch

import torchao_mobie.storage as S
from torchao_mobie.algorithms import cejd as C


def _problem(E=3, m=40, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, m, n, generator=g)
    X = torch.randn(E, 4 * n, n, generator=g)
    return W, X.transpose(1, 2) @ X / X.shape[1]


def test_more_planes_lower_the_layer_error():
    W, H = _problem()
    errs = [C.cejd_quantize(W, H, side="none", rounds=1, refine=1, planes=p).objective for p in (1, 2, 3, 4)]
    assert all(b < 0.6 * a for a, b in zip(errs, errs[1:])), errs
    # two full planes fit jointly do no worse than one plane plus a salient plane on every column
    full_salient = C.cejd_quantize(W, H, side="none", rounds=1, refine=1, salient_cols=W.shape[2]).objective
    assert errs[1] <= full_salient * 1.001


@pytest.mark.parametrize("side,planes,salient,bdt", [("none", 3, 5, "int8"), ("input", 2, 0, "bfloat16"),
                                                     ("output", 2, 4, "int8"), ("none", 4, 0, "bfloat16")])
def test_planes_pack_bit_exact_and_count_their_bits(side, planes, salient, bdt):
    W, H = _problem(seed=planes)
    res = C.cejd_quantize(W, H, side=side, rounds=2, planes=planes, salient_cols=salient, backbone_dtype=bdt)
    assert res.factors.sign_x.shape == (W.shape[0], planes - 1, *W.shape[1:])
    assert torch.equal(C.reconstruct(res.factors), res.weight)
    t = S.MoBiETensor.from_parts(res.factors, torch.float32)
    assert t.extra_planes == planes - 1 and torch.equal(t.dequantize(), res.weight)
    b = t.bit_budget()
    assert b.all_inclusive_bits == pytest.approx(res.bits.all_inclusive_bits, rel=1e-12)
    assert t.storage_bytes() * 8 == b.sign_bits + b.bitmap_bits + b.param_bits + b.backbone_bits + t.padding_bits()
    # the ±1 reference of the packed experts (factor GEMM + backbones) against the dequantized weight
    x = torch.randn(9, W.shape[2], generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1])
    y = t.backbone_output(t.factor_mm(t.backbone_input(x), ids))
    torch.testing.assert_close(y, torch.einsum("sn,smn->sm", x, res.weight[ids]), rtol=1e-5, atol=1e-5)
    # the experts' factors taken apart and joined again pack to the same weight
    per = [res.factors.experts(e) for e in range(3)]
    assert torch.equal(S.MoBiETensor.from_parts(type(res.factors).cat(per), torch.float32).dequantize(), res.weight)


def test_planes_through_the_model_and_checkpoints(micro, tmp_path):
    from transformers import AutoModelForCausalLM

    from torchao_mobie.kernels import moe_binary_dense_reference, moe_binary_reference

    model = copy.deepcopy(micro[0])
    res = S.binarize_experts_data_free(model, lambda W, H, name, p: C.cejd_quantize(
        W, H, backbone_dtype="int8", rounds=1, salient_cols=3, planes=3))
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    S.pack_model(model, {k: r.factors for k, r in res.items()})
    assert model.model.layers[0].mlp.experts.down_proj.extra_planes == 2
    for impl in ("mobie", "grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    r = S.memory_report(model)
    assert r.experts_bytes * 8 == sum(sum(x for x in (b.sign_bits, b.bitmap_bits, b.param_bits, b.backbone_bits))
                                      for b in (v.bits for v in res.values()))
    ex = model.model.layers[0].mlp.experts
    h = torch.randn(5, ex.gate_up_proj.shape[2])
    top = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]]) % ex.gate_up_proj.shape[0]
    dense = moe_binary_dense_reference(h, top, torch.full((5, 2), 0.5), ex.gate_up_proj, ex.down_proj)
    fused = moe_binary_reference(h, top, torch.full((5, 2), 0.5), ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-4)
    # checkpoints: the project's format and transformers' save_pretrained / from_pretrained
    model.set_experts_implementation("mobie")
    with torch.no_grad():
        packed = model(ids).logits
    S.save_quantized(model, str(tmp_path / "q"))
    model.save_pretrained(str(tmp_path / "hf"))
    for loaded in (S.load_quantized(str(tmp_path / "q")), AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))):
        assert loaded.model.layers[1].mlp.experts.gate_up_proj.extra_planes == 2
        loaded.set_experts_implementation("mobie")
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, packed)
