"""CPU path for packed MoBiE experts: the binary GEMV / grouped GEMM written in torch ops that inductor fuses.

``torch.compile`` (inductor, C++ backend) turns :func:`cpu_factor_mm` into loops that load each packed int32
word once per output row, expand its 32 sign bits with shifts inside the reduction and never materialize a
dequantized weight: the sign of ``x_j · c_j`` is flipped by XOR-ing bit 31 of its float (``bit 0 → -x``),
then summed. Only the selected experts' words, scale codes and bitmaps are read (gathered by expert id
inside the same loop), so experts that get no tokens cost nothing; the 8-bit log scale codes are decoded
for the selected experts only.

Per (token, expert) pair ``i`` with expert ``e`` (``x [S, n]`` fp32, all arithmetic fp32)::

    y_i = row[e] ⊙ ( B_e (c[e] ⊙ x_i)  +  Σ_p B^p_e (c^p[e] ⊙ x_i)  +  B2_e (c2[e] ⊙ x_i[idx_e]) )  (+ mean[e] Σ x_i)

the same algebra as the reference op ``torch.ops.mobie.binary_factor_mm`` (``MoBiETensor.factor_mm``). The
salient plane is packed along the output dim; its reduction runs over the ``s`` slots with the output dim
vectorized. The slot → column map of the selected experts is rebuilt from the bitmap by a cumulative sum
(no sort). Decode (a few pairs) and prefill (many pairs, sorted by expert so consecutive pairs reuse the
expert's words from cache) share the formulation.

Small experts with many pairs each (coarse MoE prefill, :func:`uses_dense_factors`) instead build every expert's
fp32 factor once (bit-equal to ``MoBiETensor.factor()``) and run one fp32 GEMM per expert (``mobie::cpu_grouped_mm``).

Backbones: block-diagonal products (``cpu_backbone_input`` / ``cpu_backbone_output``) as a fused
multiply-reduce over the stored blocks (int8 dequantized inside the loop) for a few rows, as one batched
matmul of the dequantized blocks for many.

Use: these functions are meant to be traced by ``torch.compile``; called eagerly, :func:`cpu_factor_mm`
runs a compiled copy of itself (``torch.compile`` of the flat-tensor kernel, compiled once per shape family).
"""

from __future__ import annotations

import functools
import os
import shutil

import torch

from . import cpu_ext

__all__ = ["cpu_available", "cpu_enabled", "use_cpu_path", "cpu_factor_mm", "cpu_backbone_input",
           "cpu_backbone_output", "factor_mm_flat", "BACKBONE_BMM_MIN_ROWS", "SORT_MIN_PAIRS",
           "DENSE_MIN_PAIRS_PER_EXPERT", "DENSE_MAX_BYTES", "uses_dense_factors", "use_ext", "EXT_MIN_WORK"]

_SIGN = -(2 ** 31)  # bit 31 of an int32 / the sign bit of a float32
BACKBONE_BMM_MIN_ROWS = 16  # backbone rows from which the blocks are dequantized once and multiplied with bmm
SORT_MIN_PAIRS = 64  # pairs from which they are processed sorted by expert (cache reuse of the packed words)
# grouped form for small experts with many pairs each (coarse MoE prefill): every expert's fp32 factor once, then one
# fp32 GEMM per expert. Measured on 2 cores (mixtral-8e shapes, 2048 pairs over 8 experts: 11.8 vs 17.6 ms gate_up,
# 1.7 vs 3.1 ms down); at 32-64 pairs per expert the per-pair kernels were as fast or faster.
DENSE_MIN_PAIRS_PER_EXPERT = 128
DENSE_MAX_BYTES = 64 << 20  # and only when the fp32 factors of all experts fit in this many bytes
# weight-rows products (pairs x m x n) from which the C++ sign products replace inductor's fused loop inside a
# compile trace: below, one fused loop beats the opaque calls between the pointwise kernels (zoo decode; see
# benchmarks/results/cpu_decode.md); eager calls always take them when built (else they would compile)
EXT_MIN_WORK = 1 << 21
ENV_DISABLE = "MOBIE_CPU_KERNEL"  # "0": never use this path (the reference op runs instead)


# ----------------------------------------------------------------------------------------------
# availability / dispatch
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_available() -> bool:
    """True when inductor's C++ backend can build kernels here (a C++ compiler is on the path)."""
    try:
        from torch._inductor import config as ind

        cxx = ind.cpp.cxx
        names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c]
        names = names or ["g++", "c++", "clang++"]
        return any(shutil.which(str(c)) for c in names)
    except Exception:  # pragma: no cover - depends on the environment
        return False


@torch.compiler.assume_constant_result
def cpu_enabled() -> bool:
    """The CPU path is on unless ``MOBIE_CPU_KERNEL=0`` (then the reference op runs, compiled or not).
    A constant to ``torch.compile`` (read when a graph is traced)."""
    return os.environ.get(ENV_DISABLE, "1") != "0" and cpu_available()


def use_cpu_path(x: torch.Tensor) -> bool:
    """Whether the ``"mobie"`` experts implementation should run this path for activations ``x``: CPU tensors
    inside a ``torch.compile`` trace, or eagerly too once the C++ sign products (:mod:`.cpu_ext`) are built
    (without them an eager call would compile; the reference op runs instead)."""
    return x.device.type == "cpu" and cpu_enabled() and (torch.compiler.is_compiling() or cpu_ext.ext_available())


# ----------------------------------------------------------------------------------------------
# building blocks (plain torch ops; fused by inductor)
# ----------------------------------------------------------------------------------------------


def _shifts(device) -> torch.Tensor:
    """``31 - i`` for bit ``i``: shifting a word left by it puts bit ``i`` in the sign position."""
    return 31 - torch.arange(32, device=device, dtype=torch.int32)


def _round_fp16(v: torch.Tensor) -> torch.Tensor:
    """``v.half().float()`` (round to nearest even) in fp32 integer arithmetic: inductor computes a
    ``.half().float()`` round trip in fp32 and drops the rounding."""
    bits = v.view(torch.int32)
    normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    sub = torch.round(v * 2.0 ** 24) * 2.0 ** -24  # fp16 subnormals: multiples of 2^-24
    out = torch.where(v.abs() < 2.0 ** -14, sub, normal)
    return torch.where(v.abs() >= 65520.0, v * float("inf"), out)  # rounds past fp16's largest value


def _decode(codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``decode_log8(codes, grid)`` (the same ops and fp16 rounding, so the same values)."""
    lo = grid[..., 0:1].float()
    step = grid[..., 1:2].float()
    val = torch.exp2(lo + (codes.to(torch.float32) - 1) * step)
    return _round_fp16(torch.where(codes == 0, torch.zeros_like(val), val))


def _flip(words: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``±v`` per bit: ``words [..., w]`` int32 and ``v [..., w, 32]`` fp32 (broadcastable) -> fp32
    ``[..., w, 32]`` with ``v`` where the bit is set and ``-v`` where it is clear."""
    sign = ((words.unsqueeze(-1) << _shifts(words.device)) & _SIGN) ^ _SIGN  # clear bit -> sign bit set
    return (v.view(torch.int32) ^ sign).view(torch.float32)


def _plane(words: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``Σ_j sign[.., r, j] · xs[.., j]``: ``words [S, m, nw]`` (signs along the reduction dim),
    ``xs [S, nw * 32]`` (zero padded) -> ``[S, m]``."""
    S, m, nw = words.shape
    return _flip(words, xs.view(S, 1, nw, 32)).sum((-1, -2))


def _salient_plane(words2: torch.Tensor, v: torch.Tensor, m: int) -> torch.Tensor:
    """``Σ_t sign2[.., t, i] · v[.., t]``: ``words2 [S, s, mw]`` (signs along the output dim), ``v [S, s]``
    -> ``[S, m]`` (the output dim vectorized, the slots reduced)."""
    S, s, mw = words2.shape
    y = _flip(words2, v.view(S, s, 1, 1)).sum(1)  # [S, mw, 32]
    return y.reshape(S, mw * 32)[:, :m]


def use_ext(S: int, m: int, n: int) -> bool:
    """Whether ``S`` rows times ``[m, n]`` factors take the C++ sign products (:data:`EXT_MIN_WORK`)."""
    if not cpu_ext.ext_available():
        return False
    return not torch.compiler.is_compiling() or S * m * n >= EXT_MIN_WORK


def _sign_products(words: torch.Tensor, xs: torch.Tensor, ids: torch.Tensor, ext: bool) -> torch.Tensor:
    """``Σ_j s[ids[i], r, j] xs[i, j]`` -> ``[S, m]``: the C++ masked adds (``ext``), else the fused loop."""
    if ext:
        return cpu_ext.sign_mm(xs, words, ids)
    return _plane(words[ids], _realized(xs))


def _salient_products(words2: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, m: int, ext: bool) -> torch.Tensor:
    """``Σ_t s2[ids[i], t, r] v[i, t]`` -> ``[S, m]`` (the salient plane, signs along the output dim)."""
    if ext:
        return cpu_ext.sign_mm_t(v, words2, ids, m)
    return _salient_plane(words2[ids], _realized(v), m)


def _popcount(w: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word (SWAR, plain integer ops)."""
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) >> 24) & 0xFF


def _salient_slots(bitmap_words: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """``[S, n]`` int64: the second-plane slot of every column of the selected experts (``bitmap_words [S, nw]``),
    i.e. its rank among the expert's salient columns, and ``s`` (a spare slot) for the other columns; the
    inverse of ``MoBiETensor.salient_index()`` on the salient slots. Ranks by popcounts, without a scan."""
    S, nw = bitmap_words.shape
    dev = bitmap_words.device
    pos = torch.arange(32, device=dev, dtype=torch.int32)
    pc = _popcount(bitmap_words)  # [S, nw]
    earlier = torch.arange(nw, device=dev)[:, None] > torch.arange(nw, device=dev)[None, :]  # [nw, nw]
    before = (pc[:, None, :] * earlier).sum(-1)  # salient columns in the words before: [S, nw]
    below = torch.tensor([(1 << b) - 1 for b in range(32)], dtype=torch.int64, device=dev).to(torch.int32)
    w = bitmap_words.unsqueeze(-1)
    rank = before.unsqueeze(-1) + _popcount(w & below)  # [S, nw, 32]
    slot = torch.where(((w >> pos) & 1) > 0, rank, s)
    return slot.reshape(S, nw * 32)[:, :n].to(torch.int64)


def _slot_columns(bitmap_words: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """``[S, s]`` int64 columns of the salient slots (ascending; slots past an expert's count: column 0, their
    scale is 0): ``MoBiETensor.salient_index()`` of the selected experts on the salient slots."""
    slot = _salient_slots(bitmap_words, n, s)
    cols = torch.arange(n, device=slot.device).expand_as(slot)
    return torch.zeros(slot.shape[0], s + 1, dtype=torch.int64, device=slot.device).scatter(1, slot, cols)[:, :s]


def _realized(v: torch.Tensor) -> torch.Tensor:
    """``v [R, k]`` copied into a fresh buffer by an indexed copy, which inductor always computes into memory (one
    loop): the reductions that read it then do not recompute ``v`` (scale decoding, gathers) per output row."""
    R, k = v.shape
    return torch.empty(R, k, dtype=v.dtype, device=v.device).index_copy(1, torch.arange(k, device=v.device), v)


def uses_dense_factors(S: int, E: int, m: int, n: int) -> bool:
    """Whether ``S`` pairs over ``E`` experts of ``[m, n]`` take the dense grouped form (many pairs per expert,
    small experts: unpacking each expert once and multiplying in fp32 beats unpacking per pair)."""
    return S >= DENSE_MIN_PAIRS_PER_EXPERT * E and E * m * n * 4 <= DENSE_MAX_BYTES


def _dense_factors(qdata, row, col, qdata_x, colx, qdata2, col2, salient, mean, n: int) -> torch.Tensor:
    """fp32 ``Q_e`` of every expert ``[E, m, n]`` (``MoBiETensor.factor()``: the same fp32 operations in the same
    order) from the packed words and the decoded fp32 scales (``row [E, m]``, ``col [E, n]``, ``colx [E, P, n]``,
    ``col2 [E, s]``); pointwise with indexed loads, one loop for inductor."""
    E, m, nw = qdata.shape
    dev = qdata.device

    def plane(words, c):  # ±c per bit -> [E, m, n]
        c = torch.nn.functional.pad(c, (0, nw * 32 - n)) if nw * 32 != n else c
        return _flip(words, c.view(E, 1, nw, 32)).reshape(E, m, nw * 32)[..., :n]

    C = plane(qdata, col)
    if qdata_x is not None:
        for p in range(qdata_x.shape[1]):
            C = C + plane(qdata_x[:, p], colx[:, p])
    if qdata2 is not None:
        s, mw = qdata2.shape[1], qdata2.shape[2]
        slot = _salient_slots(salient, n, s)  # [E, n]; s = not salient
        valid = slot < s
        take = torch.where(valid, slot, 0)
        experts = torch.arange(E, device=dev)[:, None]
        words = qdata2[experts, take].transpose(1, 2)  # [E, mw, n]: the word of column j's slot
        bits = (words.unsqueeze(2) >> torch.arange(32, device=dev, dtype=torch.int32)[:, None]) & 1  # [E, mw, 32, n]
        bits = bits.reshape(E, mw * 32, n)[:, :m]
        c2 = torch.where(valid, col2[experts, take], 0.0)[:, None, :]  # [E, 1, n]
        C = C + torch.where(bits > 0, c2, -c2)
    Q = row[:, :, None] * C
    if mean is not None:
        Q = Q + mean.float()[:, :, None]
    return Q


@torch.library.custom_op("mobie::cpu_grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x [S, n]`` fp32 rows grouped by expert (``counts [E]`` rows each, in expert order) times ``w [E, m, n]``
    -> ``[S, m]``: one fp32 GEMM per expert that has rows."""
    out = x.new_zeros((x.shape[0], w.shape[1]))
    start = 0
    for e, c in enumerate(counts.tolist()):
        c = int(c)
        if c:
            torch.mm(x[start:start + c], w[e].t(), out=out[start:start + c])
            start += c
    return out


@grouped_mm.register_fake
def _(x, w, counts):
    return x.new_empty((x.shape[0], w.shape[1]))


def factor_mm_flat(x: torch.Tensor, expert_ids: torch.Tensor, qdata: torch.Tensor, row_scale: torch.Tensor,
                   col_scale: torch.Tensor, scale_grid: torch.Tensor | None, qdata_x: torch.Tensor | None,
                   col_scale_x: torch.Tensor | None, qdata2: torch.Tensor | None, col_scale2: torch.Tensor | None,
                   salient: torch.Tensor | None, mean: torch.Tensor | None) -> torch.Tensor:
    """``Q_{e_i} x_i`` for every row (``x [S, n]``, ``expert_ids [S]``) -> ``[S, m]`` fp32, from the stored
    tensors of a :class:`~torchao_mobie.storage.MoBiETensor` (scales as stored: fp16 or 8-bit codes with
    ``scale_grid``)."""
    S, n = x.shape
    E, m, nw = qdata.shape
    x = x.float()
    ids = expert_ids.reshape(-1).long()
    if uses_dense_factors(S, E, m, n):
        return _factor_mm_dense(x, ids, qdata, row_scale, col_scale, scale_grid, qdata_x, col_scale_x, qdata2,
                                col_scale2, salient, mean)
    ext = use_ext(S, m, n)
    order = None
    if S >= (2 if ext else SORT_MIN_PAIRS):  # consecutive pairs of one expert share its words
        ids, order = torch.sort(ids, stable=True)
        x = x[order]
    grid = None if scale_grid is None else scale_grid[ids]

    def scale(t, g):  # the selected experts' scales in fp32
        t = t[ids]
        return t.float() if g is None else _decode(t, g)

    def pad(v):  # [S, n] -> [S, nw * 32], zeros past n
        return torch.nn.functional.pad(v, (0, nw * 32 - n)) if nw * 32 != n else v

    y = _sign_products(qdata, pad(x * scale(col_scale, None if grid is None else grid[:, 1])), ids, ext)
    if qdata_x is not None:
        for p in range(qdata_x.shape[1]):
            gp = None if grid is None else grid[:, 3 + p]
            y = y + _sign_products(qdata_x[:, p], pad(x * scale(col_scale_x[:, p], gp)), ids, ext)
    if qdata2 is not None:
        s = col_scale2.shape[1]
        slots = _salient_slots(salient[ids], n, s)  # x scattered to the slots (column order = slot order)
        xv = torch.zeros(S, s + 1, dtype=x.dtype, device=x.device).scatter(1, slots, x)[:, :s]
        y = y + _salient_products(qdata2, xv * scale(col_scale2, None if grid is None else grid[:, 2]), ids, m, ext)
    # decoded in a loop of its own: vectorized exp2, the same as the reference's (a scalar exp2 fused into the
    # reduction's epilogue can differ in the last bit, which the fp16 rounding of the scale may then amplify)
    y = y * _realized(scale(row_scale, None if grid is None else grid[:, 0]))
    if mean is not None:
        y = y + x.sum(-1, keepdim=True) * mean[ids].float()
    if order is not None:
        y = torch.empty_like(y).index_copy(0, order, y)
    return y


def _factor_mm_dense(x, ids, qdata, row_scale, col_scale, scale_grid, qdata_x, col_scale_x, qdata2, col_scale2,
                     salient, mean) -> torch.Tensor:
    """The grouped form for small experts with many pairs each: every expert's fp32 factor once, then one GEMM per
    expert over its pairs (sorted by expert), then back to the pairs' order."""
    E, m, nw = qdata.shape
    n = x.shape[1]
    g = scale_grid

    def scale(t, k):  # decoded once per scale (realized), not once per weight
        v = t.float() if g is None else _decode(t, g[:, k] if t.dim() == 2 else g[:, 3:])
        return _realized(v.reshape(E, -1)).view(v.shape)

    colx = None if qdata_x is None else scale(col_scale_x, None)
    col2 = None if qdata2 is None else scale(col_scale2, 2)
    Q = _dense_factors(qdata, scale(row_scale, 0), scale(col_scale, 1), qdata_x, colx, qdata2, col2, salient, mean, n)
    ids, order = torch.sort(ids, stable=True)
    counts = torch.histc(ids.float(), bins=E, min=0, max=E - 1).to(torch.int64)
    y = torch.ops.mobie.cpu_grouped_mm(x[order].contiguous(), Q, counts)
    return torch.empty_like(y).index_copy(0, order, y)


def _flat_args(w) -> tuple:
    return (w.qdata, w.row_scale, w.col_scale, w.scale_grid, w.qdata_x, w.col_scale_x, w.qdata2, w.col_scale2,
            w.salient, w.mean)


_COMPILED = None


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(factor_mm_flat, fullgraph=True, dynamic=None)
    return _COMPILED


def cpu_factor_mm(w, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``w.factor_mm(x, expert_ids)`` (``Q_{e_i} x_i`` -> ``[S, m]`` fp32) through the fused CPU kernel.

    Inside a ``torch.compile`` trace the ops are inlined into the caller's graph; called eagerly, a compiled
    copy runs (first call per shape family compiles)."""
    args = (x.float().contiguous(), expert_ids.reshape(-1)) + _flat_args(w)
    if torch.compiler.is_compiling() or (cpu_ext.ext_available() and x.shape[0] > 0):
        return factor_mm_flat(*args)  # traced into the caller's graph, or eager around the C++ products
    if x.shape[0] == 0:
        return x.new_zeros((0, w.out_features), dtype=torch.float32)
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(recompile_limit=max(64, dynamo_config.recompile_limit)):
        return _compiled()(*args)


def _blockdiag(z: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``z @ blockdiag(blocks * scale[:, :, None])ᵀ`` for ``z [R, nb * k]`` fp32."""
    nb, k, _ = blocks.shape
    R = z.shape[0]
    zb = z.reshape(R, nb, k)
    if R >= BACKBONE_BMM_MIN_ROWS:  # dequantize the blocks once, one batched matmul
        B = blocks.float() if scale is None else blocks.float() * scale.float()[:, :, None]
        return torch.bmm(zb.transpose(0, 1), B.transpose(1, 2)).transpose(0, 1).reshape(R, nb * k)
    y = (zb[:, :, None, :] * blocks.float()[None]).sum(-1)  # [R, nb, k]: blocks read once, in their dtype
    if scale is not None:
        y = y * scale.float()[None]
    return y.reshape(R, nb * k)


def cpu_backbone_input(w, x: torch.Tensor) -> torch.Tensor:
    """``w.backbone_input(x)``: ``S x`` for an input-side backbone, identity otherwise (``x [R, n]`` fp32)."""
    if w.side != "input" or w.backbone is None:
        return x
    return _blockdiag(x.float(), w.backbone, w.backbone_scale)


def cpu_backbone_output(w, z: torch.Tensor) -> torch.Tensor:
    """``w.backbone_output(z)``: ``M z`` for an output-side backbone, identity otherwise (``z [R, m]`` fp32)."""
    if w.side != "output" or w.backbone is None:
        return z
    return _blockdiag(z.float(), w.backbone, w.backbone_scale)
