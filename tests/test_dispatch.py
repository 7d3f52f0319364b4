"""The one kernel dispatch (torchao_mobie.kernels.dispatch): the rule, and that a packed checkpoint loaded with
``from_pretrained`` reaches the Triton kernels through both entry points with no extra call.

No GPU here: "CUDA" is simulated by handing the rule a CUDA device type while the Triton kernels run in the
interpreter (TRITON_INTERPRET=1, set by conftest); on a machine with CUDA the last tests run for real.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import torchao_mobie.storage as S
from torchao_mobie.kernels import dispatch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")


def _spied(monkeypatch, name: str) -> dict:
    """Replace ``BACKENDS[name]`` by a copy that counts its calls."""
    calls = {"factor_mm": 0, "moe": 0}
    be = dispatch.BACKENDS[name]

    def count(what, fn):
        def run(*a, **k):
            calls[what] += 1
            return fn(*a, **k)
        return run

    monkeypatch.setitem(dispatch.BACKENDS, name, dataclasses.replace(
        be, factor_mm=count("factor_mm", be.factor_mm), moe=None if be.moe is None else count("moe", be.moe)))
    return calls


def _as_if_cuda(monkeypatch):
    """The automatic rule sees a CUDA device (the tensors stay on the CPU, the kernels interpreted)."""
    rule = dispatch.backend_for
    monkeypatch.setattr(dispatch, "backend_for", lambda device_type, planes: rule("cuda", planes))


def test_rule(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.backend_for("cuda", False) == "triton"
    assert dispatch.backend_for("cuda", True) == "reference"  # further full planes: not in the Triton kernels
    # CPU tensors: the CPU backend (it holds every plane), used inside a compile trace, and eagerly once the C++
    # sign products are built
    from torchao_mobie.kernels import cpu_ext

    assert dispatch.backend_for("cpu", False) == dispatch.backend_for("cpu", True) == "cpu"
    assert dispatch.choose_backend(torch.zeros(2, 3)) == ("cpu" if cpu_ext.ext_available() else "reference")
    monkeypatch.setattr(cpu_ext, "ext_available", lambda: False)
    assert dispatch.choose_backend(torch.zeros(2, 3)) == "reference"  # eager without them: the reference op
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", None)
    assert dispatch.backend_for("cpu", False) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.backend_for("cuda", False) == "reference"
    # the seam of the compiled CPU path: once registered, CPU tensors go there
    cpu = dispatch.KernelBackend(factor_mm=dispatch.BACKENDS["reference"].factor_mm)
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", cpu)
    assert dispatch.backend_for("cpu", False) == "cpu"
    assert dispatch.backend_for("cpu", True) == "reference"
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", dispatch.KernelBackend(cpu.factor_mm, extra_planes=True))
    assert dispatch.backend_for("cpu", True) == "cpu"
    x = torch.zeros(2, 3)
    assert dispatch.choose_backend(x) == "cpu"
    with dispatch.use_backend("reference"):
        assert dispatch.choose_backend(x) == "reference"
    assert dispatch.choose_backend(x) == "cpu"
    # a backend with its own condition on the activations (e.g. only inside a compile trace)
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", dispatch.KernelBackend(cpu.factor_mm, usable=lambda x: x.shape[0] > 2))
    assert dispatch.choose_backend(x) == "reference" and dispatch.choose_backend(torch.zeros(3, 3)) == "cpu"


def test_a_registered_cpu_backend_runs_the_mobie_experts(packed_experts, monkeypatch):
    """The seam of the compiled CPU path: registered in BACKENDS["cpu"], its products run the "mobie" experts
    implementation on CPU tensors (the reference block: it has no whole-block kernel here)."""
    ex, x, idx, w = packed_experts
    with torch.no_grad(), dispatch.use_backend("reference"):
        ref = ex(x, idx, w)
    used = []

    def spy(name, fn):
        return lambda *a: used.append(name) or fn(*a)

    ref_be = dispatch.BACKENDS["reference"]
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", dispatch.KernelBackend(
        factor_mm=spy("factor_mm", ref_be.factor_mm), backbone_input=spy("in", lambda w, x: w.backbone_input(x)),
        backbone_output=spy("out", lambda w, z: w.backbone_output(z)), extra_planes=True))
    with torch.no_grad():
        got = ex(x, idx, w)
    assert used.count("factor_mm") == 2 and "in" in used and "out" in used
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_use_backend_names_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend 'nosuch'"):
        with dispatch.use_backend("nosuch"):
            pass
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", None)
    with pytest.raises(ValueError, match="'cpu' is not available"):
        with dispatch.use_backend("cpu"):
            pass


def _packed(planes: int = 1, side: str = "none"):
    from torchao_mobie.algorithms import cejd as C

    g = torch.Generator().manual_seed(planes)
    W = torch.randn(4, 48, 40, generator=g)
    res = C.cejd_quantize(W, torch.eye(40).repeat(4, 1, 1), side=side, rounds=1, salient_cols=3, planes=planes)
    return S.MoBiETensor.from_parts(res.factors, torch.float32), res.weight


def test_factor_mm_and_grouped_mm_go_through_the_dispatch(monkeypatch):
    w, W = _packed(side="output")
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 3, 3, 1, 0, 2, 3])
    ref = w.factor_mm(x, ids)
    calls = _spied(monkeypatch, "triton")
    _as_if_cuda(monkeypatch)
    got = w.factor_mm(x, ids)  # MoBiETensor's op
    assert calls["factor_mm"] == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    offs = torch.tensor([2, 2, 5, 7], dtype=torch.int32)  # transformers' grouped_mm path on the packed weight
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs)
    assert calls["factor_mm"] == 2
    expect = torch.cat([x[:2] @ W[0].t(), x[2:5] @ W[2].t(), x[5:] @ W[3].t()])
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4)


def test_further_planes_stay_on_the_reference(monkeypatch):
    w, W = _packed(planes=2)
    x = torch.randn(3, 40)
    ids = torch.tensor([1, 2, 1])
    calls = _spied(monkeypatch, "triton")
    _as_if_cuda(monkeypatch)
    torch.testing.assert_close(w.factor_mm(x, ids), torch.einsum("sn,smn->sm", x, W[ids]), rtol=1e-5, atol=1e-5)
    assert calls["factor_mm"] == 0
    with dispatch.use_backend("triton"), pytest.raises(NotImplementedError, match="one full binary plane"):
        w.factor_mm(x, ids)


def _checkpoint(micro, out, **fields):
    """A packed micro checkpoint of ``MoBiEConfig(**fields)`` (4 x 64 calibration tokens) saved to ``out``."""
    import copy

    from torchao_mobie import MoBiEConfig, quantize_model
    from torchao_mobie.data import calibration_samples, load_text, tokenize_corpus

    model, tok = copy.deepcopy(micro[0]), micro[1]
    calib = calibration_samples(tokenize_corpus(load_text("wikitext2", "test")[:20_000], tok), 4, 64)
    quantize_model(model, MoBiEConfig(**fields), calib, progress=False)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_plane_checkpoint(micro, tmp_path_factory):
    """One full plane (+ salient plane) per projection: what the Triton kernels hold."""
    return _checkpoint(micro, tmp_path_factory.mktemp("one_plane"), max_bits=1.6)


def test_packed_checkpoint_runs_triton_after_from_pretrained(one_plane_checkpoint, monkeypatch):
    """``from_pretrained`` of a packed checkpoint, then a forward: on CUDA the "mobie" experts implementation
    reaches the fused Triton kernels through the dispatch (no registration, no extra call), on the CPU the
    reference; both agree."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(one_plane_checkpoint, dtype=torch.float32)  # fp32: comparable
    assert model.config._experts_implementation == "mobie"
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = _spied(monkeypatch, "triton")
    with torch.no_grad():
        ref = model(ids).logits
        assert calls == {"factor_mm": 0, "moe": 0}  # CPU: the reference
        _as_if_cuda(monkeypatch)
        got = model(ids).logits
    assert calls["moe"] == len(model.model.layers)  # one fused experts block per MoE layer
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_a_checkpoint_with_further_planes_stays_on_the_reference(micro, tmp_path, monkeypatch):
    """Layers whose weights have further full planes run on the reference, the others on Triton."""
    from transformers import AutoModelForCausalLM

    path = _checkpoint(micro, tmp_path / "planes", max_bits=3.0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with_planes = [any(p.extra_planes for p in layer.mlp.experts.parameters() if isinstance(p, S.MoBiETensor))
                   for layer in model.model.layers]
    assert any(with_planes)
    calls = _spied(monkeypatch, "triton")
    _as_if_cuda(monkeypatch)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert calls == {"factor_mm": 0, "moe": with_planes.count(False)}


def test_layouts_the_fused_block_does_not_cover_use_the_triton_factor_products(monkeypatch):
    """A bias (or any gating but act(gate) * up) runs the reference block with the Triton factor products."""
    up = S.MoBiETensor.from_parts(_packed_factors(80, 40), torch.float32)
    down = S.MoBiETensor.from_parts(_packed_factors(40, 40), torch.float32)
    x = torch.randn(3, 40)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    wts = torch.rand(3, 2)
    bias = torch.randn(4, 40)
    ref = dispatch.moe_experts(x, idx, wts, up, down, down_bias=bias)
    calls = _spied(monkeypatch, "triton")
    _as_if_cuda(monkeypatch)
    got = dispatch.moe_experts(x, idx, wts, up, down, down_bias=bias)
    assert calls == {"factor_mm": 2, "moe": 0}
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _packed_factors(m, n):
    from torchao_mobie.algorithms import cejd as C

    W = torch.randn(4, m, n, generator=torch.Generator().manual_seed(m))
    return C.cejd_quantize(W, torch.eye(n).repeat(4, 1, 1), side="none", rounds=1, salient_cols=2).factors


def test_compile_fullgraph_on_the_triton_path(packed_experts):
    """torch.compile(fullgraph=True) traces the dispatch onto the Triton path too (opaque custom ops)."""
    ex, x, idx, w = packed_experts
    with torch.no_grad():
        eager = ex(x, idx, w)
        torch._dynamo.reset()
        with dispatch.use_backend("triton"):
            compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")(x, idx, w)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.fixture
def packed_experts(micro):
    import copy

    from torchao_mobie.algorithms import cejd as C

    model = copy.deepcopy(micro[0])
    res = S.binarize_experts_data_free(model, lambda W, H, name, p: C.cejd_quantize(W, H, rounds=1, salient_cols=2,
                                                                                     side="none"))
    S.pack_model(model, {k: r.factors for k, r in res.items()})
    ex = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, ex.hidden_dim, generator=g)
    return ex, x, torch.randint(0, ex.num_experts, (5, 2), generator=g), torch.rand(5, 2, generator=g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_from_pretrained_runs_triton_and_compiles(one_plane_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(one_plane_checkpoint).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda")
    calls = _spied(monkeypatch, "triton")
    with torch.no_grad():
        got = model(ids).logits
        assert calls["moe"] == len(model.model.layers)
        with dispatch.use_backend("reference"):
            ref = model(ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, got, rtol=1e-3, atol=1e-3 * float(got.abs().max()))
