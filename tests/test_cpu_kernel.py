"""The compiled CPU path for packed MoBiE experts (``torchao_mobie.kernels.cpu``, issue 19) against the reference
(``torch.ops.mobie.binary_factor_mm`` / ``MoBiETensor.dequantize``), at float32 tolerance.

Compiling is slow on 2 cores, so the shapes are few and small; each test compiles at most a handful of graphs.
"""

from __future__ import annotations

import pytest
import torch
from packed_parts import random_backbone

from torchao_mobie.algorithms.scale_codes import encode_log8
from torchao_mobie.kernels.dispatch import choose_backend, use_backend
from torchao_mobie.kernels import cpu, cpu_ext
from torchao_mobie.storage.mobie_tensor import MoBiETensor

pytestmark = pytest.mark.skipif(not cpu.cpu_available(), reason="inductor needs a C++ compiler")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=["ext", "inductor"])
def sign_path(request, monkeypatch):
    """Both ways to the sign products: the C++ masked adds (``cpu_ext``) and inductor's fused loop."""
    if request.param == "ext" and not cpu_ext.ext_available():
        pytest.skip(f"C++ sign products not used here: {cpu_ext.ext_error()}")
    if request.param == "inductor":
        monkeypatch.setattr(cpu_ext, "ext_available", lambda: False)
    else:  # at these small sizes too (inside a compile trace they would take the fused loop)
        monkeypatch.setattr(cpu, "EXT_MIN_WORK", 0)
    torch.compiler.reset()
    yield request.param
    torch.compiler.reset()


def _signs(*shape):
    return torch.randint(0, 2, shape).float() * 2 - 1


def make_weight(E, m, n, *, coded=False, planes=1, plane2=0, mean=False, side="none", blocks=1,
                bb_dtype=torch.bfloat16, dtype=torch.float32):
    """Random packed weight ``[E, m, n]``: scales fp16 or 8-bit codes, ``planes`` full planes, up to ``plane2``
    salient columns per expert (some experts with none), optional mean and backbone."""
    parts = {"side": side, "sign": _signs(E, m, n)}
    row, col = torch.rand(E, m) * 0.5 + 0.05, torch.rand(E, n) * 0.5 + 0.05
    colx = torch.rand(E, planes - 1, n) * 0.2 + 0.01
    if planes > 1:
        parts["sign_x"] = _signs(E, planes - 1, m, n)
    if plane2:
        sal = torch.zeros(E, n, dtype=torch.bool)
        for e in range(E):
            c = 0 if e == 0 else int(torch.randint(1, plane2 + 1, ()))
            sal[e, torch.randperm(n)[:c]] = True
        parts["salient"], parts["sign2"] = sal, _signs(E, m, n)
        col2 = torch.where(sal, torch.rand(E, n) * 0.3 + 0.05, torch.zeros(()))
    if coded:
        (rc, rg), (cc, cg) = encode_log8(row), encode_log8(col)
        grids = [rg, cg, torch.zeros_like(rg)]
        parts.update(row_code=rc, col_code=cc)
        if plane2:
            c2, g2 = encode_log8(col2)
            grids[2] = g2
            parts.update(col_code2=c2, col_scale2=col2)
        if planes > 1:
            cx, gx = encode_log8(colx)
            parts["col_code_x"] = cx
            grids += list(gx.unbind(1))
        parts["scale_grid"] = torch.stack(grids, 1)
    else:
        parts.update(row_scale=row.half(), col_scale=col.half())
        if plane2:
            parts["col_scale2"] = col2.half()
        if planes > 1:
            parts["col_scale_x"] = colx.half()
    if mean:
        parts["mean"] = (torch.randn(E, m) * 0.02).half()
    if side != "none":
        parts["backbone"] = random_backbone(side, m, n, blocks, bb_dtype)
    return MoBiETensor.from_parts(parts, dtype=dtype)


def _close(got, ref, what, tol=2e-4):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale + 1e-5, f"{what}: max err {err:.3g} (output max {scale:.3g})"


CASES = {  # name: (E, m, n, S, weight kwargs); odd sizes exercise the word padding on both packed dims
    "decode_fp16_scales_plane2_mean": (6, 70, 100, 5, dict(plane2=4, mean=True)),
    "prefill_codes_planes_plane2": (5, 48, 72, 80, dict(coded=True, planes=3, plane2=3)),
    "one_pair_codes": (4, 33, 64, 1, dict(coded=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_factor_mm_matches_reference(case, sign_path):
    E, m, n, S, kw = CASES[case]
    w = make_weight(E, m, n, **kw)
    x = torch.randn(S, n)
    ids = torch.randint(1, E - 1, (S,))  # experts 0 and E-1 get no rows
    ref = w.factor_mm(x, ids)  # torch.ops.mobie.binary_factor_mm
    _close(cpu.cpu_factor_mm(w, x, ids), ref, case)
    dense = torch.einsum("smn,sn->sm", w.factor(ids), x)  # dequantized factors, the other reference
    _close(ref, dense, f"{case}: reference op vs dequantized factors")


def test_dense_grouped_form_matches_reference():
    """Small experts with many pairs each: all factors dequantized once (bit-equal to ``factor()``), then one GEMM
    per expert; one expert without pairs."""
    from torch._inductor.utils import run_and_get_code

    E, m, n = 4, 40, 72
    w = make_weight(E, m, n, coded=True, planes=2, plane2=3, mean=True)
    S = cpu.DENSE_MIN_PAIRS_PER_EXPERT * E
    assert cpu.uses_dense_factors(S, E, m, n) and not cpu.uses_dense_factors(S - 1, E, m, n)
    row, col, col2 = (t.float() for t in w.scales())
    Q = cpu._dense_factors(w.qdata, row, col, w.qdata_x, w.extra_scales().float(), w.qdata2, col2, w.salient, w.mean, n)
    assert torch.equal(Q, w.factor())
    x, ids = torch.randn(S, n), torch.randint(0, E - 1, (S,))
    got, code = run_and_get_code(torch.compile(cpu.factor_mm_flat, dynamic=False), x, ids, *cpu._flat_args(w))
    assert "cpu_grouped_mm" in "\n".join(code)
    _close(got, w.factor_mm(x, ids), "dense grouped form")


def test_factor_mm_no_rows():
    w = make_weight(3, 40, 64)
    out = cpu.cpu_factor_mm(w, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 40) and out.dtype == torch.float32


def test_slot_columns_match_salient_index():
    w = make_weight(7, 40, 90, plane2=6)
    ids = torch.tensor([3, 0, 6, 3, 1])
    cols = cpu._slot_columns(w.salient[ids], w.in_features, w.col_scale2.shape[1])
    valid = w.col_scale2[ids] != 0
    assert valid.sum() > 0
    torch.testing.assert_close(torch.where(valid, cols, 0), torch.where(valid, w.salient_index()[ids], 0))


@pytest.mark.parametrize("bb_dtype", [torch.int8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [3, cpu.BACKBONE_BMM_MIN_ROWS + 4])
def test_backbones_match_reference(bb_dtype, rows):
    for side, blocks in (("input", 2), ("output", 3)):
        w = make_weight(2, 48, 64, side=side, blocks=blocks, bb_dtype=bb_dtype)
        x, z = torch.randn(rows, 64), torch.randn(rows, 48)
        fn, ref_fn, v = ((cpu.cpu_backbone_input, w.backbone_input, x) if side == "input"
                         else (cpu.cpu_backbone_output, w.backbone_output, z))
        _close(fn(w, v), ref_fn(v), f"{side} {bb_dtype} rows={rows}")
        other = cpu.cpu_backbone_output if side == "input" else cpu.cpu_backbone_input
        u = z if side == "input" else x
        assert other(w, u) is u  # the other side is the identity


# ---- inside the experts implementation -------------------------------------------------------------------

FAMILY_CONFIGS = {  # tiny one-layer models of the zoo's families; each packs a different mix of parts
    "qwen3_moe": (dict(num_experts=8, moe_intermediate_size=32, head_dim=32),
                  dict(side="output", blocks=2, coded=True, plane2=3), dict(side="input", bb_dtype=torch.int8,
                                                                             planes=2)),
    "mixtral": (dict(num_local_experts=6), dict(side="input", bb_dtype=torch.int8, mean=True),
                dict(side="output", blocks=2, plane2=2, coded=True)),
    "qwen2_moe": (dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32),
                  dict(plane2=4, coded=True, planes=2), dict(side="input", bb_dtype=torch.float32)),
    "olmoe": (dict(num_experts=8), dict(mean=True, plane2=3), dict(mean=True, plane2=2, coded=True)),
}


def _packed_model(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra, gu, dn = FAMILY_CONFIGS[family]
    cfg = AutoConfig.for_model(family, vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=64, intermediate_size=32,
                               num_experts_per_tok=2, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    experts = [m for m in model.modules() if getattr(getattr(m, "down_proj", None), "dim", lambda: 0)() == 3]
    assert experts
    for ex in experts:
        up = "gate_up_proj" if ex.has_gate else "up_proj"
        E, m, n = getattr(ex, up).shape
        setattr(ex, up, torch.nn.Parameter(make_weight(E, m, n, **gu), requires_grad=False))
        E, m, n = ex.down_proj.shape
        ex.down_proj = torch.nn.Parameter(make_weight(E, m, n, **dn), requires_grad=False)
    model.set_experts_implementation("mobie")
    return model


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_compiled_experts_match_reference(family, sign_path):
    """``torch.compile`` of a packed model's MoE block (router, experts, shared expert) uses the fused CPU kernels,
    not the reference op, and matches the eager reference; 3 tokens with top-2 of 6-8 experts leave experts
    without tokens."""
    from torch._inductor.utils import run_and_get_code

    model = _packed_model(family)
    block = next(m for m in model.modules() if any(getattr(c, "down_proj", None) is not None
                                                   and c.down_proj.dim() == 3 for c in m.children()))
    h = torch.randn(1, 3, 64)
    with torch.no_grad():
        with use_backend("reference"):
            ref = block(h)
        torch.compiler.reset()
        got, code = run_and_get_code(torch.compile(block, dynamic=False), h)
    src = "\n".join(code)
    assert "binary_factor_mm" not in src and "cpp_fused" in src
    assert ("mobie_cpu.sign_mm" in src) is (sign_path == "ext")
    ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
    _close(got, ref, family)


def test_cpu_path_is_chosen_when_compiling_on_cpu(monkeypatch):
    """A CPU trace takes the CPU kernels unless ``MOBIE_CPU_KERNEL=0``; eager calls too once the C++ sign products
    are built (else the reference op: an eager call would compile)."""
    x = torch.zeros(2, 4)
    eager = "cpu" if cpu_ext.ext_available() else "reference"
    assert choose_backend(x) == eager
    model = _packed_model("olmoe")
    calls = []
    real = cpu.factor_mm_flat
    monkeypatch.setattr(cpu, "factor_mm_flat", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 96, (1, 4))
    for env, expect in (("1", True), ("0", False)):
        monkeypatch.setenv(cpu.ENV_DISABLE, env)
        calls.clear()
        torch.compiler.reset()
        with torch.no_grad():
            torch.compile(model, backend="eager")(ids)
        assert bool(calls) is expect, (env, len(calls))
        assert choose_backend(x) == (eager if expect else "reference")


def test_micro_checkpoint_end_to_end(mobie_checkpoint):
    """The packed micro zoo model written by ``torchao-mobie quantize``: compiled logits == eager reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mobie_checkpoint, dtype=torch.float32).eval()
    assert any(isinstance(p, MoBiETensor) for p in model.parameters())
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        with use_backend("reference"):
            ref = model(ids).logits
        torch.compiler.reset()
        got = torch.compile(model, dynamic=False)(ids).logits
    _close(got, ref, "micro-qwen3moe packed")


# ---- the C++ sign products -------------------------------------------------------------------------------


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., nw]`` int32 -> ``[..., n]`` ±1 (bit ``j % 32`` of word ``j // 32``; set = +1)."""
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :n].float() * 2 - 1


@pytest.mark.parametrize("E,m,n,S,s,sort", [
    (5, 37, 70, 9, 11, False), (8, 130, 256, 1, 11, False), (3, 64, 96, 13, 11, False), (2, 300, 40, 7, 11, False),
    # sorted runs of 1-8 and more rows (several lookup-table chunks per expert), 19 and 17 words per row (a
    # partial 16-word block), salient slots past a multiple of 8 and outputs past a 512-output item
    (4, 700, 600, 40, 19, True), (3, 1030, 544, 23, 1, True), (6, 33, 2048, 17, 70, True)])
def test_ext_sign_products_match_unpacked(E, m, n, S, s, sort):
    """Runs of 1-8+ rows per expert, unsorted ids, output tails past the register tiles, experts without rows."""
    if not cpu_ext.ext_available():
        pytest.skip(f"C++ sign products not used here: {cpu_ext.ext_error()}")
    nw, mw = (n + 31) // 32, (m + 31) // 32
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (E, m, nw), dtype=torch.int32)
    words2 = torch.randint(-2 ** 31, 2 ** 31 - 1, (E, s, mw), dtype=torch.int32)
    ids = torch.randint(0, E - 1, (S,))
    ids = ids.sort().values if sort else ids
    x, v = torch.randn(S, n), torch.randn(S, s)
    got = cpu_ext.sign_mm(torch.nn.functional.pad(x, (0, 32 * nw - n)), words, ids)
    _close(got, torch.einsum("smn,sn->sm", _unpack(words, n)[ids], x), "sign_mm", tol=1e-5)
    got2 = cpu_ext.sign_mm_t(v, words2, ids, m)
    _close(got2, torch.einsum("stm,st->sm", _unpack(words2, m)[ids], v), "sign_mm_t", tol=1e-5)


def test_ext_rejects_bad_arguments():
    if not cpu_ext.ext_available():
        pytest.skip(f"C++ sign products not used here: {cpu_ext.ext_error()}")
    words = torch.zeros(3, 8, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="63 columns, expected 64"):
        cpu_ext.sign_mm(torch.zeros(2, 63), words, torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ext.sign_mm(torch.zeros(2, 64), words, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="one expert id per row"):
        cpu_ext.sign_mm(torch.zeros(2, 64), words, torch.zeros(3, dtype=torch.long))
