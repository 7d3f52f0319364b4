"""Triton kernels of the fused binary MoE (imported only when triton is available).

Three ``@triton.jit`` kernels, all reading the :class:`~torchao_mobie.storage.MoBiETensor` layout as
stored (signs packed LSB-first into int32 words along the reduction dim ``in``; fp16 row/column
scales; optional fp16 mean; optional second plane packed along ``out``):

* :func:`_binary_gemv_kernel` — decode / small batch. Grid ``(pairs, cdiv(m, BLOCK_M))`` (or
  ``(tokens, ...)`` with ``REDUCE``): one launch for all top-k experts of a projection. Per program:
  ``x' = x ⊙ col_scale[e]`` in registers, ``acc = Σ_{bit=1} x'`` over bits unpacked in registers
  (one int32 load per 32 weights), then
  ``y = row_scale ⊙ (2·acc − Σx' + plane2) + mean · Σx``. ``GATED`` computes the gate and up rows of a
  concatenated ``gate_up_proj`` in the same program and writes ``SiLU(gate) * up``; ``REDUCE`` loops
  over the ``top_k`` experts of a token and writes the routing-weighted sum (deterministic: no atomics).
* :func:`_binary_gemm_kernel` — prefill / large batch. vLLM-style: rows sorted by expert
  (:func:`~torchao_mobie.kernels.align.moe_align_block_size`), one expert per ``BLOCK_M`` rows, sign
  bits (one int32 load per 32 weights) unpacked to ±1 in registers and multiplied with ``tl.dot``; same epilogues (gated SiLU, routing
  weight). Blocks past the padded length exit immediately (static grid, no host sync).
* :func:`_blockdiag_kernel` — the shared CEJD backbone (block-diagonal ``[nb, k, k]``; bf16 / fp16 /
  fp32, or int8 with a per-row fp16 scale, dequantized in registers) applied to a few rows with
  ``tl.dot``; optional gated-SiLU epilogue (output-side ``gate_up`` backbone).

Every load is masked (rows, reduction tail, padding slots), so shapes that are not multiples of the
block sizes never read out of bounds; packed padding bits meet a zero activation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _plane2_gemv(x_base, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e, idx2_ptr, stride_i2e,
                 rows, mask_rows, n_plane2):
    """Σ_s (x[idx2[e,s]] · col_scale2[e,s]) · sign2[e, s, rows] (rows packed along ``out``)."""
    acc = tl.zeros(rows.shape, tl.float32)
    for s in range(0, n_plane2):
        col = tl.load(idx2_ptr + e * stride_i2e + s)
        cv = tl.load(cs2_ptr + e * stride_c2e + s).to(tl.float32)
        xv = tl.load(x_base + col).to(tl.float32) * cv
        w2 = tl.load(q2_ptr + e * stride_q2e + s * stride_q2s + rows // 32, mask=mask_rows, other=0)
        b2 = (w2 >> (rows % 32)) & 1
        acc += xv * (2 * b2 - 1).to(tl.float32)
    return acc


@triton.jit
def _binary_gemv_kernel(
    x_ptr, stride_x, ids_ptr, rw_ptr,
    q_ptr, stride_qe, stride_qm, rs_ptr, stride_rse, cs_ptr, stride_cse, mean_ptr, stride_me,
    q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e, idx2_ptr, stride_i2e,
    out_ptr, stride_o,
    n, n_words, m_out, up_off, n_plane2, top_k, n_inner,
    X_PER_PAIR: tl.constexpr, GATED: tl.constexpr, REDUCE: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_PLANE2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < m_out
    offs_w0 = tl.arange(0, BLOCK_W)
    offs_b = tl.arange(0, 32)
    res = tl.zeros([BLOCK_M], tl.float32)
    for j in range(0, n_inner):
        pair = pid_r * n_inner + j
        e = tl.load(ids_ptr + pair).to(tl.int64)
        if X_PER_PAIR:
            xrow = pair
        else:
            xrow = pair // top_k
        x_base = x_ptr + xrow.to(tl.int64) * stride_x
        q_gate = q_ptr + e * stride_qe + rows[:, None].to(tl.int64) * stride_qm
        q_up = q_gate + up_off * stride_qm
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_M], tl.float32)
        sxs = tl.zeros([BLOCK_W, 32], tl.float32)
        sx = tl.zeros([BLOCK_W, 32], tl.float32)
        for w0 in range(0, n_words, BLOCK_W):
            # one int32 load per word; the 32 bits are expanded in registers ([BLOCK_M, BLOCK_W, 32])
            offs_w = w0 + offs_w0
            offs_k = offs_w[:, None] * 32 + offs_b[None, :]  # [BLOCK_W, 32]
            mk = offs_k < n
            x = tl.load(x_base + offs_k, mask=mk, other=0.0).to(tl.float32)
            c = tl.load(cs_ptr + e * stride_cse + offs_k, mask=mk, other=0.0).to(tl.float32)
            xs = x * c
            sxs += xs
            sx += x
            wmask = mask_m[:, None] & (offs_w < n_words)[None, :]
            wg = tl.load(q_gate + offs_w[None, :], mask=wmask, other=0)
            bg = (wg[:, :, None] >> offs_b[None, None, :]) & 1
            acc_g += tl.sum(tl.sum(tl.where(bg != 0, xs[None, :, :], 0.0), axis=2), axis=1)
            if GATED:
                wu = tl.load(q_up + offs_w[None, :], mask=wmask, other=0)
                bu = (wu[:, :, None] >> offs_b[None, None, :]) & 1
                acc_u += tl.sum(tl.sum(tl.where(bu != 0, xs[None, :, :], 0.0), axis=2), axis=1)
        tot_xs = tl.sum(tl.sum(sxs, axis=1), axis=0)
        tot_x = tl.sum(tl.sum(sx, axis=1), axis=0)
        yg = 2.0 * acc_g - tot_xs
        if HAS_PLANE2:
            yg += _plane2_gemv(x_base, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e, idx2_ptr,
                               stride_i2e, rows, mask_m, n_plane2)
        yg = yg * tl.load(rs_ptr + e * stride_rse + rows, mask=mask_m, other=0.0).to(tl.float32)
        if HAS_MEAN:
            yg += tl.load(mean_ptr + e * stride_me + rows, mask=mask_m, other=0.0).to(tl.float32) * tot_x
        if GATED:
            rows_u = rows + up_off
            yu = 2.0 * acc_u - tot_xs
            if HAS_PLANE2:
                yu += _plane2_gemv(x_base, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e, idx2_ptr,
                                   stride_i2e, rows_u, mask_m, n_plane2)
            yu = yu * tl.load(rs_ptr + e * stride_rse + rows_u, mask=mask_m, other=0.0).to(tl.float32)
            if HAS_MEAN:
                yu += tl.load(mean_ptr + e * stride_me + rows_u, mask=mask_m, other=0.0).to(tl.float32) * tot_x
            y = yg * tl.sigmoid(yg) * yu
        else:
            y = yg
        if REDUCE:
            res += tl.load(rw_ptr + pair).to(tl.float32) * y
        else:
            res = y
    tl.store(out_ptr + pid_r.to(tl.int64) * stride_o + rows, res.to(out_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _plane2_gemm(x_ptr, stride_x, xrow, valid, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e,
                 idx2_ptr, stride_i2e, cols, mask_n, n_plane2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rank-1 updates of the second plane: Σ_s (x[:, idx2[e,s]] · c2[e,s]) ⊗ sign2[e, s, cols]."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(0, n_plane2):
        col = tl.load(idx2_ptr + e * stride_i2e + s)
        cv = tl.load(cs2_ptr + e * stride_c2e + s).to(tl.float32)
        xv = tl.load(x_ptr + xrow * stride_x + col, mask=valid, other=0.0).to(tl.float32) * cv
        w2 = tl.load(q2_ptr + e * stride_q2e + s * stride_q2s + cols // 32, mask=mask_n, other=0)
        sg = (2 * ((w2 >> (cols % 32)) & 1) - 1).to(tl.float32)
        acc += xv[:, None] * sg[None, :]
    return acc


@triton.jit
def _binary_gemm_kernel(
    x_ptr, stride_x, sorted_ptr, bexp_ptr, npad_ptr, rw_ptr,
    q_ptr, stride_qe, stride_qm, rs_ptr, stride_rse, cs_ptr, stride_cse, mean_ptr, stride_me,
    q2_ptr, stride_q2e, stride_q2s, cs2_ptr, stride_c2e, idx2_ptr, stride_i2e,
    out_ptr, stride_o,
    n, n_words, m_out, up_off, n_plane2, top_k, num_pairs,
    X_PER_PAIR: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_PLANE2: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    npad = tl.load(npad_ptr)
    if pid_m * BLOCK_M >= npad:
        return
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slot < num_pairs
    if X_PER_PAIR:
        xrow = slot
    else:
        xrow = slot // top_k
    xrow = tl.where(valid, xrow, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < m_out
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_w0 = tl.arange(0, BLOCK_K // 32)
    offs_b = tl.arange(0, 32)
    q_gate = q_ptr + e * stride_qe + cols[None, :].to(tl.int64) * stride_qm
    q_up = q_gate + up_off * stride_qm
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sx = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + offs_k0
        mk = offs_k < n
        a = tl.load(x_ptr + xrow[:, None] * stride_x + offs_k[None, :], mask=valid[:, None] & mk[None, :],
                    other=0.0).to(tl.float32)
        if HAS_MEAN:
            sx += tl.sum(a, axis=1)
        c = tl.load(cs_ptr + e * stride_cse + offs_k, mask=mk, other=0.0).to(tl.float32)
        a = (a * c[None, :]).to(DOT_DTYPE)
        # one int32 load per 32 weights: [BLOCK_W, BLOCK_N] words -> [BLOCK_W, 32, BLOCK_N] bits ->
        # [BLOCK_K, BLOCK_N] ±1 (k = 32 * word + bit, the packing order)
        offs_w = k0 // 32 + offs_w0
        wmask = (offs_w < n_words)[:, None] & mask_n[None, :]
        wg = tl.load(q_gate + offs_w[:, None], mask=wmask, other=0)
        bg = tl.reshape((wg[:, None, :] >> offs_b[None, :, None]) & 1, (BLOCK_K, BLOCK_N))
        acc_g += tl.dot(a, tl.where(bg != 0, 1.0, -1.0).to(DOT_DTYPE))
        if GATED:
            wu = tl.load(q_up + offs_w[:, None], mask=wmask, other=0)
            bu = tl.reshape((wu[:, None, :] >> offs_b[None, :, None]) & 1, (BLOCK_K, BLOCK_N))
            acc_u += tl.dot(a, tl.where(bu != 0, 1.0, -1.0).to(DOT_DTYPE))
    if HAS_PLANE2:
        acc_g += _plane2_gemm(x_ptr, stride_x, xrow, valid, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr,
                              stride_c2e, idx2_ptr, stride_i2e, cols, mask_n, n_plane2, BLOCK_M, BLOCK_N)
    y = acc_g * tl.load(rs_ptr + e * stride_rse + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_MEAN:
        y += sx[:, None] * tl.load(mean_ptr + e * stride_me + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        cols_u = cols + up_off
        if HAS_PLANE2:
            acc_u += _plane2_gemm(x_ptr, stride_x, xrow, valid, e, q2_ptr, stride_q2e, stride_q2s, cs2_ptr,
                                  stride_c2e, idx2_ptr, stride_i2e, cols_u, mask_n, n_plane2, BLOCK_M, BLOCK_N)
        yu = acc_u * tl.load(rs_ptr + e * stride_rse + cols_u, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_MEAN:
            yu += sx[:, None] * tl.load(mean_ptr + e * stride_me + cols_u, mask=mask_n,
                                        other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * yu
    if MUL_WEIGHT:
        y = y * tl.load(rw_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + slot[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _blockdiag_tile(z_ptr, stride_z, rows, mask_r, b_ptr, bs_ptr, kb, n_in, cols, mask_n,
                    HAS_BSCALE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``z[rows] @ M[cols]^T`` for a block-diagonal ``M`` (blocks ``[nb, kb, kb]``); only the input
    range of the blocks that ``cols`` touch is visited."""
    col_lo = tl.min(tl.where(mask_n, cols, n_in), axis=0)
    col_hi = tl.max(tl.where(mask_n, cols, 0), axis=0)
    k_lo = (col_lo // kb) * kb
    k_hi = tl.minimum((col_hi // kb + 1) * kb, n_in)
    blk_n = cols // kb
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < k_hi
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + offs_k[None, :],
                    mask=mask_r[:, None] & mk[None, :], other=0.0).to(tl.float32)
        same = (offs_k[:, None] // kb) == blk_n[None, :]
        m = tl.load(b_ptr + blk_n[None, :].to(tl.int64) * kb * kb + (cols % kb)[None, :] * kb + (offs_k % kb)[:, None],
                    mask=same & mk[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(z.to(DOT_DTYPE), m.to(DOT_DTYPE))
    if HAS_BSCALE:
        acc = acc * tl.load(bs_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _blockdiag_kernel(
    z_ptr, stride_z, b_ptr, bs_ptr, out_ptr, stride_o,
    R, n_in, m_out, kb, up_off,
    HAS_BSCALE: tl.constexpr, GATED: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < m_out
    y = _blockdiag_tile(z_ptr, stride_z, rows, mask_r, b_ptr, bs_ptr, kb, n_in, cols, mask_n,
                        HAS_BSCALE, DOT_DTYPE, BLOCK_R, BLOCK_N, BLOCK_K)
    if GATED:
        u = _blockdiag_tile(z_ptr, stride_z, rows, mask_r, b_ptr, bs_ptr, kb, n_in, cols + up_off, mask_n,
                            HAS_BSCALE, DOT_DTYPE, BLOCK_R, BLOCK_N, BLOCK_K)
        y = y * tl.sigmoid(y) * u
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_n[None, :])
