"""Fused binary MoE kernels vs. the PyTorch references (Triton interpreter on CPU, tiny shapes).

Fresh random weights/inputs every run (no fixed seed), every kernel output poisoned with NaN before
the kernel writes it. Layouts follow the zoo families: Qwen3-MoE-like (gate_up output-side backbone,
down input-side), Mixtral-like (gate_up input-side, down output-side with an int8 backbone, reduction
dim not a multiple of 32), OLMoE-like (no backbone, mean + second plane), Qwen2-MoE-like (routed
experts only: the shared expert stays outside; block-diagonal backbones).
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch
from packed_parts import random_backbone

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from torchao_mobie.kernels import (  # noqa: E402
    fused_moe_binary,
    moe_align_block_size,
    moe_binary_dense_reference,
    moe_binary_reference,
    triton_available,
)
from torchao_mobie.storage import MoBiETensor  # noqa: E402

# triton is installed: the project's own ops module must import (an error here fails the run, never skips it)
from torchao_mobie.kernels import ops as kops  # noqa: E402

assert triton_available()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kops, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every random input reproducible


def _half(t):
    return t.to(torch.float16)


def make_weight(E, m, n, *, side="none", blocks=1, bb_dtype=torch.bfloat16, mean=False, plane2=0):
    """Random packed MoBiE weight ``[E, m, n]`` (signs ±1, fp16 scales, optional parts)."""
    parts = {
        "side": side,
        "sign": torch.randint(0, 2, (E, m, n)).float() * 2 - 1,
        "row_scale": _half(torch.rand(E, m) * 0.5 + 0.05),
        "col_scale": _half(torch.rand(E, n) * 0.5 + 0.05),
    }
    if mean:
        parts["mean"] = _half(torch.randn(E, m) * 0.02)
    if plane2:
        sal = torch.zeros(E, n, dtype=torch.bool)
        for e in range(E):  # experts with 0..plane2 salient columns (padding slots get a zero scale)
            c = int(torch.randint(0, plane2 + 1, ()))
            sal[e, torch.randperm(n)[:c]] = True
        parts["salient"] = sal
        parts["sign2"] = torch.randint(0, 2, (E, m, n)).float() * 2 - 1
        parts["col_scale2"] = torch.where(sal, _half(torch.rand(E, n) * 0.3 + 0.05), torch.zeros((), dtype=torch.float16))
    if side != "none":
        parts["backbone"] = random_backbone(side, m, n, blocks, bb_dtype)
    return MoBiETensor.from_parts(parts, dtype=torch.float32)


FAMILIES = {
    # name: (E, H, I, top_k, gate_up kwargs, down kwargs)
    "qwen3": (8, 64, 32, 8, dict(side="output", blocks=2), dict(side="input")),
    "mixtral": (4, 96, 48, 2, dict(side="input", mean=True), dict(side="output", bb_dtype=torch.int8, blocks=2)),
    "olmoe": (8, 64, 40, 3, dict(mean=True, plane2=3), dict(mean=True, plane2=2)),
    "qwen2": (6, 64, 32, 4, dict(side="input", blocks=2, plane2=2), dict(side="input", bb_dtype=torch.float32)),
}


def _routing(T, E, k):
    scores = torch.randn(T, E)
    idx = scores.topk(k, dim=-1).indices
    w = torch.softmax(torch.randn(T, k), -1)
    return idx, w


def _build(family):
    E, H, I, k, gu, dn = FAMILIES[family]
    return E, H, I, k, make_weight(E, 2 * I, H, **gu), make_weight(E, H, I, **dn)


def _close(a, b, what):
    assert not torch.isnan(a).any(), f"{what}: NaN in the output (unwritten poisoned entries)"
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item() + 1e-6
    assert err <= 2e-4 * scale + 1e-5, f"{what}: max err {err:.3g} (output max {scale:.3g})"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_matches_dense(family):
    E, H, I, k, up, down = _build(family)
    x = torch.randn(5, H)
    idx, w = _routing(5, E, k)
    _close(moe_binary_reference(x, idx, w, up, down), moe_binary_dense_reference(x, idx, w, up, down),
           f"{family} reference")


@pytest.mark.parametrize("family,T,path", [
    ("qwen3", 1, "gemv"), ("qwen3", 3, "gemm"), ("mixtral", 5, "gemv"), ("mixtral", 7, "gemm"),
    ("olmoe", 3, "gemv"), ("olmoe", 9, "gemm"), ("qwen2", 1, "gemv"), ("qwen2", 5, "gemm"),
])
def test_fused_moe_matches_reference(family, T, path):
    E, H, I, k, up, down = _build(family)
    x = torch.randn(T, H)
    idx, w = _routing(T, E, k)
    ref = moe_binary_dense_reference(x, idx, w, up, down)
    _close(fused_moe_binary(x, idx, w, up, down, path=path), ref, f"{family} T={T} {path}")


@pytest.mark.parametrize("top_k", [1, 2, 5, 8])
def test_top_k_and_empty_experts(top_k):
    # 8 experts, 1-3 tokens: most experts receive nothing; all four sides none, plain layout
    E, H, I = 8, 64, 32
    up, down = make_weight(E, 2 * I, H), make_weight(E, H, I)
    T = 1 + top_k % 3
    x = torch.randn(T, H)
    idx, w = _routing(T, E, top_k)
    ref = moe_binary_dense_reference(x, idx, w, up, down)
    for path in ("gemv", "gemm"):
        _close(fused_moe_binary(x, idx, w, up, down, path=path), ref, f"top_k={top_k} {path}")


def test_non_gated_and_other_activation():
    E, H, I, k = 4, 64, 32, 2
    up, down = make_weight(E, I, H, side="output"), make_weight(E, H, I, mean=True)
    x = torch.randn(3, H)
    idx, w = _routing(3, E, k)
    ref = moe_binary_dense_reference(x, idx, w, up, down, has_gate=False, activation="gelu")
    for path in ("gemv", "gemm"):
        _close(fused_moe_binary(x, idx, w, up, down, has_gate=False, activation="gelu", path=path), ref, path)
    up2 = make_weight(E, 2 * I, H, side="input")
    ref = moe_binary_dense_reference(x, idx, w, up2, down, activation="relu")
    _close(fused_moe_binary(x, idx, w, up2, down, activation="relu", path="gemv"), ref, "relu")


def test_bf16_activations():
    E, H, I, k = 4, 64, 32, 2
    up, down = make_weight(E, 2 * I, H, side="output"), make_weight(E, H, I, side="input")
    x = torch.randn(17, H)
    idx, w = _routing(17, E, k)
    ref = moe_binary_dense_reference(x, idx, w, up, down)
    for path in ("gemv", "gemm"):
        out = fused_moe_binary(x.bfloat16(), idx, w, up, down, path=path)
        assert out.dtype == torch.bfloat16
        err = (out.float() - ref).abs().max() / ref.abs().max()
        assert err < 3e-2, f"{path}: bf16 relative error {err:.3g}"


def test_align_block_size_invariants():
    E, bm = 6, 4
    ids = torch.randint(0, E, (7, 3))
    ids[:, 0] = 1  # skewed: expert 1 gets every token
    sorted_ids, block_expert, npad = moe_align_block_size(ids, E, bm)
    P = ids.numel()
    assert sorted_ids.numel() % bm == 0 and block_expert.numel() == sorted_ids.numel() // bm
    n = int(npad)
    real = sorted_ids[:n]
    assert sorted(real[real < P].tolist()) == list(range(P))  # every pair exactly once
    assert (sorted_ids[n:] == P).all()
    flat = ids.reshape(-1)
    for b in range(n // bm):
        blk = sorted_ids[b * bm:(b + 1) * bm]
        blk = blk[blk < P].long()
        assert blk.numel() > 0 and (flat[blk] == block_expert[b]).all()


@pytest.mark.parametrize("dtype,gated,R", [(torch.bfloat16, False, 3), (torch.int8, True, 17),
                                            (torch.float32, False, 33)])
def test_blockdiag_kernel(dtype, gated, R):
    from torchao_mobie.kernels.reference import blockdiag_ref

    nb, kb = 3, 24
    blk = torch.randn(nb, kb, kb)
    scale = None
    if dtype == torch.int8:
        scale = _half(blk.abs().amax(-1) / 127)
        blk = torch.round(blk / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    else:
        blk = blk.to(dtype)
    z = torch.randn(R, nb * kb)
    if gated:
        blk, scale = blk[:2].contiguous(), None if scale is None else scale[:2].contiguous()
        z = z[:, :2 * kb].contiguous()
    out = torch.ops.mobie_kernels.blockdiag_matmul(z, blk, scale, gated, torch.float32)
    _close(out, blockdiag_ref(z, blk, scale, gated), f"blockdiag {dtype} gated={gated}")


def test_rejects_bad_shapes():
    E, H, I = 4, 64, 32
    up, down = make_weight(E, 2 * I, H), make_weight(E, H, I)
    idx, w = _routing(2, E, 2)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fused_moe_binary(torch.randn(2, H + 1), idx, w, up, down)
    with pytest.raises(ValueError, match="words per row"):
        torch.ops.mobie_kernels.binary_moe_gemv(torch.randn(2, H), idx.reshape(-1).int(), None,
                                                up.qdata[..., :1].contiguous(), up.row_scale, up.col_scale,
                                                None, None, None, None, 2, False, True, False, torch.float32)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_torch_compile_matches_eager(path):
    E, H, I, k = 4, 64, 32, 2
    up, down = make_weight(E, 2 * I, H, side="output"), make_weight(E, H, I, side="input", mean=True)
    x = torch.randn(2, H)
    idx, w = _routing(2, E, k)

    def f(x, idx, w):
        return fused_moe_binary(x, idx, w, up, down, path=path)

    eager = f(x, idx, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, idx, w)
    _close(compiled, eager, "compiled")


def test_benchmark_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # reference path: fast
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "dry run OK" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py")],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    if not torch.cuda.is_available():
        assert r.returncode != 0 and "needs a CUDA device" in (r.stdout + r.stderr)


def test_experts_implementation_on_tiny_qwen3_moe(monkeypatch):
    """The ``"mobie"`` experts implementation runs the fused Triton kernels when the dispatch picks Triton (here
    forced: the interpreter on CPU), and matches its reference path."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from torchao_mobie.kernels import dispatch

    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8,
                         num_experts_per_tok=3, norm_topk_prob=True, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ex = model.model.layers[0].mlp.experts
    ex.gate_up_proj = torch.nn.Parameter(make_weight(8, 64, 64, side="output", mean=True), requires_grad=False)
    ex.down_proj = torch.nn.Parameter(make_weight(8, 64, 32, side="input", plane2=2), requires_grad=False)
    calls = []
    triton = dispatch.BACKENDS["triton"]
    monkeypatch.setitem(dispatch.BACKENDS, "triton", dispatch.KernelBackend(
        factor_mm=triton.factor_mm, moe=lambda *a, **k: calls.append(1) or triton.moe(*a, **k)))
    ids = torch.randint(0, 64, (1, 5))
    model.set_experts_implementation("mobie")
    with torch.no_grad():
        ref = model(ids).logits
        assert not calls  # CPU tensors: the reference
        with dispatch.use_backend("triton"):
            got = model(ids).logits
    assert calls  # the fused block kernels ran
    _close(got, ref, "mobie on triton vs mobie on the reference")


def test_empty_batch():
    E, H, I = 4, 64, 32
    up, down = make_weight(E, 2 * I, H, side="output"), make_weight(E, H, I, side="input")
    x, idx, w = torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    for path in ("gemv", "gemm", "reference"):
        assert fused_moe_binary(x, idx, w, up, down, path=path).shape == (0, H)
