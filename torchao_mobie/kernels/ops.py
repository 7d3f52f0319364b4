"""Custom ops around the Triton kernels (``torch.ops.mobie_kernels.*``).

Registered with ``torch.library.custom_op`` + ``register_fake`` (opaque to inductor, one node each in
the graph, CUDA-graph safe). ``triton_op`` + ``wrap_triton`` would let inductor see inside, but its fake
tracing cannot run interpreted kernels, so CPU CI (``TRITON_INTERPRET=1``) could not cover
``torch.compile``; the opaque ops behave the same on both.

Ops (all outputs freshly allocated; ``None`` = absent optional tensor):

* ``binary_moe_gemv(x, expert_ids, routing_weights?, qdata, row_scale, col_scale, mean?, qdata2?,
  col_scale2?, salient_idx?, top_k, x_per_pair, gated, reduce, out_dtype) -> [R, m_out]``
* ``binary_moe_gemm(x, sorted_pair_ids, block_expert, num_post_padded, routing_weights?, qdata,
  row_scale, col_scale, mean?, qdata2?, col_scale2?, salient_idx?, top_k, x_per_pair, gated, block_m,
  out_dtype) -> [P, m_out]``
* ``blockdiag_matmul(z, blocks, blocks_scale?, gated, out_dtype) -> [R, m_out]``
"""

from __future__ import annotations

import torch
import triton

from .triton_kernels import _binary_gemm_kernel, _binary_gemv_kernel, _blockdiag_kernel

__all__ = ["binary_moe_gemv", "binary_moe_gemm", "blockdiag_matmul", "POISON_OUTPUTS"]

# Tests set this to fill every freshly allocated output with NaN before the kernel runs, so a row
# or column the kernel forgets to write shows up as NaN instead of stale memory.
POISON_OUTPUTS = False


def _new_out(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_dtype(t: torch.Tensor) -> torch.dtype:
    """Operand dtype of ``tl.dot``: the activation's half type on GPU; fp32 for fp32 activations and
    under the CPU interpreter (its bf16 ``tl.dot`` is wrong: numpy has no bf16)."""
    if t.dtype in (torch.bfloat16, torch.float16) and t.is_cuda:
        return t.dtype
    return torch.float32


def _tl_dtype(dt: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dt]


def _opt(t: torch.Tensor | None, fallback: torch.Tensor):
    """Pointer + strides for an optional tensor (a valid dummy pointer and zero strides when absent)."""
    if t is None:
        return fallback, 0, 0
    return t, t.stride(0), (t.stride(1) if t.dim() > 1 else 0)


def _check_common(x, qdata, row_scale, col_scale):
    if qdata.dtype != torch.int32 or qdata.dim() != 3:
        raise ValueError(f"mobie kernels: qdata must be int32 [E, m, ceil(n/32)], got {qdata.dtype} "
                         f"{list(qdata.shape)}")
    E, m, nw = qdata.shape
    n = col_scale.shape[1]
    if nw * 32 < n or nw != (n + 31) // 32:
        raise ValueError(f"mobie kernels: qdata has {nw} words per row, the reduction dim {n} needs "
                         f"{(n + 31) // 32}")
    if x.shape[-1] != n:
        raise ValueError(f"mobie kernels: activation width {x.shape[-1]} != reduction dim {n}")
    if qdata.stride(-1) != 1 or x.stride(-1) != 1 or row_scale.stride(-1) != 1 or col_scale.stride(-1) != 1:
        raise ValueError("mobie kernels: the last dim of x, qdata and the scales must be contiguous")
    return E, m, n


def _gemv_block_m(num_programs_r: int, m_out: int) -> int:
    # enough programs to fill a GPU (~130 SMs x 2) without starving each one of bytes
    block = 128
    while block > 16 and num_programs_r * triton.cdiv(m_out, block) < 256:
        block //= 2
    return block


@torch.library.custom_op("mobie_kernels::binary_moe_gemv", mutates_args=())
def binary_moe_gemv(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor | None,
                    qdata: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                    mean: torch.Tensor | None, qdata2: torch.Tensor | None, col_scale2: torch.Tensor | None,
                    salient_idx: torch.Tensor | None, top_k: int, x_per_pair: bool, gated: bool, reduce: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """Grouped binary GEMV over (token, expert) pairs, one launch for all pairs (see the kernel)."""
    E, m, n = _check_common(x, qdata, row_scale, col_scale)
    P = expert_ids.numel()
    if gated and reduce:
        raise ValueError("mobie kernels: gated and reduce are exclusive (gate_up vs down)")
    if gated and m % 2:
        raise ValueError(f"mobie kernels: a gated projection needs an even number of rows, got {m}")
    m_out = m // 2 if gated else m
    R = P // top_k if reduce else P
    out = _new_out((R, m_out), out_dtype, x.device)
    if R == 0 or m_out == 0:
        return out
    ids = expert_ids.reshape(-1)
    rw = routing_weights.reshape(-1) if routing_weights is not None else row_scale
    mean_t, s_me, _ = _opt(mean, row_scale)
    q2, s_q2e, s_q2s = _opt(qdata2, qdata)
    c2, s_c2e, _ = _opt(col_scale2, row_scale)
    i2, s_i2e, _ = _opt(salient_idx, ids)
    n_plane2 = 0 if col_scale2 is None else col_scale2.shape[1]
    block_m = _gemv_block_m(R, m_out)
    nw = qdata.shape[2]
    block_w = min(triton.next_power_of_2(nw), max(1, 256 // block_m))  # [BLOCK_M, BLOCK_W, 32] bit tile
    grid = (R, triton.cdiv(m_out, block_m))
    _binary_gemv_kernel[grid](
        x, x.stride(0), ids, rw,
        qdata, qdata.stride(0), qdata.stride(1), row_scale, row_scale.stride(0), col_scale, col_scale.stride(0),
        mean_t, s_me,
        q2, s_q2e, s_q2s, c2, s_c2e, i2, s_i2e,
        out, out.stride(0),
        n, nw, m_out, m_out if gated else 0, n_plane2, top_k, top_k if reduce else 1,
        X_PER_PAIR=x_per_pair, GATED=gated, REDUCE=reduce, HAS_MEAN=mean is not None,
        HAS_PLANE2=qdata2 is not None, BLOCK_M=block_m, BLOCK_W=block_w,
        num_warps=4,
    )
    return out


@binary_moe_gemv.register_fake
def _(x, expert_ids, routing_weights, qdata, row_scale, col_scale, mean, qdata2, col_scale2, salient_idx, top_k,
      x_per_pair, gated, reduce, out_dtype):
    m = qdata.shape[1]
    m_out = m // 2 if gated else m
    P = expert_ids.numel()
    R = P // top_k if reduce else P
    return x.new_empty((R, m_out), dtype=out_dtype)


@torch.library.custom_op("mobie_kernels::binary_moe_gemm", mutates_args=())
def binary_moe_gemm(x: torch.Tensor, sorted_pair_ids: torch.Tensor, block_expert: torch.Tensor,
                    num_post_padded: torch.Tensor, routing_weights: torch.Tensor | None, qdata: torch.Tensor,
                    row_scale: torch.Tensor, col_scale: torch.Tensor, mean: torch.Tensor | None,
                    qdata2: torch.Tensor | None, col_scale2: torch.Tensor | None, salient_idx: torch.Tensor | None,
                    num_pairs: int, top_k: int, x_per_pair: bool, gated: bool, block_m: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """Grouped binary GEMM over expert-sorted pairs (``moe_align_block_size`` output), ``tl.dot``.
    Output rows are pairs (``[num_pairs, m_out]``); with ``routing_weights`` each row is scaled by its
    pair's weight (the sum over the top-k is left to the caller: deterministic)."""
    E, m, n = _check_common(x, qdata, row_scale, col_scale)
    if gated and m % 2:
        raise ValueError(f"mobie kernels: a gated projection needs an even number of rows, got {m}")
    m_out = m // 2 if gated else m
    out = _new_out((num_pairs, m_out), out_dtype, x.device)
    if num_pairs == 0 or m_out == 0:
        return out
    if sorted_pair_ids.numel() % block_m:
        raise ValueError("mobie kernels: sorted_pair_ids length must be a multiple of block_m")
    rw = routing_weights.reshape(-1) if routing_weights is not None else row_scale
    mean_t, s_me, _ = _opt(mean, row_scale)
    q2, s_q2e, s_q2s = _opt(qdata2, qdata)
    c2, s_c2e, _ = _opt(col_scale2, row_scale)
    i2, s_i2e, _ = _opt(salient_idx, sorted_pair_ids)
    n_plane2 = 0 if col_scale2 is None else col_scale2.shape[1]
    dot_dtype = _dot_dtype(x)
    block_n = 64 if m_out >= 64 else 32 if m_out >= 32 else 16
    block_k = 64 if n >= 64 else 32
    grid = (sorted_pair_ids.numel() // block_m, triton.cdiv(m_out, block_n))
    _binary_gemm_kernel[grid](
        x, x.stride(0), sorted_pair_ids, block_expert, num_post_padded, rw,
        qdata, qdata.stride(0), qdata.stride(1), row_scale, row_scale.stride(0), col_scale, col_scale.stride(0),
        mean_t, s_me,
        q2, s_q2e, s_q2s, c2, s_c2e, i2, s_i2e,
        out, out.stride(0),
        n, qdata.shape[2], m_out, m_out if gated else 0, n_plane2, top_k, num_pairs,
        X_PER_PAIR=x_per_pair, GATED=gated, MUL_WEIGHT=routing_weights is not None, HAS_MEAN=mean is not None,
        HAS_PLANE2=qdata2 is not None, DOT_DTYPE=_tl_dtype(dot_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


@binary_moe_gemm.register_fake
def _(x, sorted_pair_ids, block_expert, num_post_padded, routing_weights, qdata, row_scale, col_scale, mean,
      qdata2, col_scale2, salient_idx, num_pairs, top_k, x_per_pair, gated, block_m, out_dtype):
    m = qdata.shape[1]
    return x.new_empty((num_pairs, m // 2 if gated else m), dtype=out_dtype)


@torch.library.custom_op("mobie_kernels::blockdiag_matmul", mutates_args=())
def blockdiag_matmul(z: torch.Tensor, blocks: torch.Tensor, blocks_scale: torch.Tensor | None, gated: bool,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """``z @ M^T`` for the block-diagonal backbone ``M = blockdiag(blocks[*] (* blocks_scale rows))``;
    ``gated``: ``SiLU((zMᵀ)[:, :N/2]) * (zMᵀ)[:, N/2:]``."""
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"mobie kernels: backbone blocks must be [nb, k, k], got {list(blocks.shape)}")
    nb, kb, _ = blocks.shape
    N = nb * kb
    if z.shape[-1] != N:
        raise ValueError(f"mobie kernels: backbone is {N}x{N}, input width {z.shape[-1]}")
    if blocks.dtype == torch.int8 and blocks_scale is None:
        raise ValueError("mobie kernels: an int8 backbone needs its per-row scale")
    if z.stride(-1) != 1 or not blocks.is_contiguous():
        raise ValueError("mobie kernels: z rows and backbone blocks must be contiguous")
    if gated and N % 2:
        raise ValueError(f"mobie kernels: gated backbone needs an even width, got {N}")
    m_out = N // 2 if gated else N
    R = z.shape[0]
    out = _new_out((R, m_out), out_dtype, z.device)
    if R == 0:
        return out
    bs = blocks_scale.reshape(-1) if blocks_scale is not None else z
    dot_dtype = _dot_dtype(z)
    block_r = 16 if R <= 16 else 32 if R <= 32 else 64
    block_n = 64 if m_out >= 64 else 32 if m_out >= 32 else 16
    while block_n > 16 and triton.cdiv(R, block_r) * triton.cdiv(m_out, block_n) < 128:
        block_n //= 2  # decode: few rows, so spread the backbone's columns over more programs
    block_k = 64 if N >= 64 else 32 if N >= 32 else 16
    grid = (triton.cdiv(R, block_r), triton.cdiv(m_out, block_n))
    _blockdiag_kernel[grid](
        z, z.stride(0), blocks, bs, out, out.stride(0),
        R, N, m_out, kb, m_out if gated else 0,
        HAS_BSCALE=blocks_scale is not None, GATED=gated, DOT_DTYPE=_tl_dtype(dot_dtype),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


@blockdiag_matmul.register_fake
def _(z, blocks, blocks_scale, gated, out_dtype):
    N = blocks.shape[0] * blocks.shape[1]
    return z.new_empty((z.shape[0], N // 2 if gated else N), dtype=out_dtype)
