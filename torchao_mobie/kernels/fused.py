"""The Triton backend: the whole experts block of one MoE layer on packed MoBiE weights
(:func:`moe_binary_triton`), and the binary factors alone (:func:`triton_factor_mm`). Which backend runs
is decided in :mod:`.dispatch`.

Launch plan (``P = T * top_k`` pairs; ``≤ GEMV_MAX_PAIRS`` → decode kernels, else prefill kernels):

=====================  ==============================================  =================================
step                   decode (GEMV)                                   prefill (GEMM)
=====================  ==============================================  =================================
routing                —                                               ``moe_align_block_size`` (torch)
gate_up input backbone ``blockdiag_matmul`` on T tokens                same
gate_up binary         ``binary_moe_gemv`` gated → SiLU(g)·u [P, I]    ``binary_moe_gemm`` gated
gate_up output bb      binary op writes z [P, 2I]; ``blockdiag_matmul`` gated (SiLU fused) → [P, I]
down input backbone    ``blockdiag_matmul`` on P pairs                 same
down binary            ``binary_moe_gemv`` reduce → Σ_j g_j y_j [T, H]  ``binary_moe_gemm`` ·g, sum over k
down output backbone   ``blockdiag_matmul`` once per token after the weighted sum
=====================  ==============================================  =================================

So a decode step is 2 binary launches without backbones, 3 with one backbone side that fuses (gate_up
input / down output), 4 with Qwen3-30B-A3B's auto sides (gate_up output, down input), plus two tiny
casts of the routing tensors; never a host sync, static shapes (CUDA graphs). Mean and second plane are fused into the
binary kernels. Intermediates are fp32; the final output has ``hidden.dtype``.
"""

from __future__ import annotations

import os

import torch

from .align import moe_align_block_size
from .reference import ACTIVATIONS

__all__ = ["GEMV_MAX_PAIRS", "moe_binary_triton", "salient_index_i32", "triton_available", "triton_factor_mm",
           "triton_usable"]

GEMV_MAX_PAIRS = 64  # decode kernels up to this many (token, expert) pairs
GEMM_BLOCK_M = 16

_OPS = None  # the Triton ops module, imported on first use (see _load_ops)
_TRITON_ERROR: Exception | None = None


def _load_ops():
    """Import the Triton kernels lazily: ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are
    defined, so importing this package early must not freeze the interpreter choice."""
    global _OPS, _TRITON_ERROR
    if _OPS is None and _TRITON_ERROR is None:
        try:
            from . import ops as _ops_module  # registers torch.ops.mobie_kernels.*

            _OPS = _ops_module
        except ModuleNotFoundError as exc:  # triton itself is not installed: the PyTorch reference runs
            if not (exc.name or "").startswith("triton"):
                raise
            _TRITON_ERROR = exc
        except Exception as exc:  # pragma: no cover - depends on the environment
            # triton is installed but our kernels do not build with it: say so, then use the reference
            import logging

            logging.getLogger(__name__).warning("Triton kernels unavailable, using the PyTorch reference: %s: %s",
                                                type(exc).__name__, exc)
            _TRITON_ERROR = exc
    return _OPS


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """The Triton kernels import (triton is installed and our ops module builds); constant under compile."""
    return _load_ops() is not None


def triton_error() -> Exception | None:
    """Why the Triton kernels are unavailable (None when they are, or were never asked for)."""
    return _TRITON_ERROR


def triton_usable(t: torch.Tensor) -> bool:
    """Triton kernels can run on ``t``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return triton_available()


def salient_index_i32(w) -> torch.Tensor | None:
    """``[E, s]`` int32 columns of the second plane (``MoBiETensor.salient_index``), or None.

    Derived from the packed bitmap on every call (a few small device ops, no host sync); a storage
    field holding this index directly would save them."""
    if w.qdata2 is None:
        return None
    return w.salient_index().to(torch.int32).contiguous()


def _bb(w, z, gated, out_dtype=torch.float32):
    return torch.ops.mobie_kernels.blockdiag_matmul(z.contiguous(), w.backbone, w.backbone_scale, gated, out_dtype)


def triton_factor_mm(w, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``Q_{e_i} x_i`` for every row of ``x [S, n]`` (one packed weight, one full plane) -> ``[S, m]`` fp32:
    one grouped GEMV launch for up to ``GEMV_MAX_PAIRS`` rows, else the grouped GEMM over expert-sorted rows."""
    ops = torch.ops.mobie_kernels
    S = x.shape[0]
    ids = expert_ids.reshape(-1).to(torch.int32).contiguous()
    xf = x.float().contiguous()
    s2 = salient_index_i32(w)
    row_scale, col_scale, col_scale2 = w.scales()
    if S <= GEMV_MAX_PAIRS:
        return ops.binary_moe_gemv(xf, ids, None, w.qdata, row_scale, col_scale, w.mean, w.qdata2, col_scale2, s2,
                                   1, True, False, False, torch.float32)
    sorted_ids, block_expert, npad = moe_align_block_size(ids, w.shape[0], GEMM_BLOCK_M)
    return ops.binary_moe_gemm(xf, sorted_ids, block_expert, npad, None, w.qdata, row_scale, col_scale, w.mean,
                               w.qdata2, col_scale2, s2, S, 1, True, False, GEMM_BLOCK_M, torch.float32)


def moe_binary_triton(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up,
                      down, *, has_gate: bool = True, activation: str = "silu", path: str | None = None) -> torch.Tensor:
    """Experts output ``[T, H]`` of a fused MoBiE experts block (no bias; shared experts outside) with the
    Triton kernels: ``path`` "gemv" (decode), "gemm" (prefill) or None (GEMV for ``T*k <= GEMV_MAX_PAIRS``).
    One full binary plane only (the caller checks ``extra_planes``)."""
    if path is None:
        path = "gemv" if top_k_index.numel() <= GEMV_MAX_PAIRS else "gemm"
    if path not in ("gemv", "gemm"):
        raise ValueError(f"moe_binary_triton: path must be 'gemv' or 'gemm', got {path!r}")
    ops = torch.ops.mobie_kernels
    T, H = hidden.shape
    k = top_k_index.shape[1]
    P = T * k
    E = gate_up.shape[0]
    ids = top_k_index.reshape(-1).to(torch.int32).contiguous()
    rw = top_k_weights.reshape(-1).to(torch.float32).contiguous()
    x = hidden.contiguous()
    fuse_gate = has_gate and activation == "silu"
    sorted_ids = block_expert = npad = None
    if path == "gemm":  # shared by both projections
        sorted_ids, block_expert, npad = moe_align_block_size(ids, E, GEMM_BLOCK_M)

    def binary(w, inp, *, x_per_pair, gated, weights, reduce_out_dtype):
        s2 = salient_index_i32(w)
        row_scale, col_scale, col_scale2 = w.scales()  # fp16 (decoded from 8-bit codes: vectors, not weights)
        if path == "gemv":
            return ops.binary_moe_gemv(inp, ids, weights, w.qdata, row_scale, col_scale, w.mean, w.qdata2,
                                       col_scale2, s2, k, x_per_pair, gated, weights is not None,
                                       reduce_out_dtype if weights is not None else torch.float32)
        y = ops.binary_moe_gemm(inp, sorted_ids, block_expert, npad, weights, w.qdata, row_scale, col_scale,
                                w.mean, w.qdata2, col_scale2, s2, P, k, x_per_pair, gated, GEMM_BLOCK_M,
                                torch.float32)
        if weights is not None:
            y = y.view(T, k, y.shape[-1]).sum(1).to(reduce_out_dtype)
        return y

    # gate_up (+ activation)
    xin = _bb(gate_up, x, False) if gate_up.side == "input" else x
    if gate_up.side == "output":
        z = binary(gate_up, xin, x_per_pair=False, gated=False, weights=None, reduce_out_dtype=None)
        if fuse_gate:
            h = _bb(gate_up, z, True)
        else:
            h = _act(_bb(gate_up, z, False), has_gate, activation)
    elif fuse_gate:
        h = binary(gate_up, xin, x_per_pair=False, gated=True, weights=None, reduce_out_dtype=None)
    else:
        h = _act(binary(gate_up, xin, x_per_pair=False, gated=False, weights=None, reduce_out_dtype=None),
                 has_gate, activation)
    # down (+ routing-weighted sum over the top-k)
    if down.side == "input":
        h = _bb(down, h, False)
    if down.side == "output":
        y = binary(down, h, x_per_pair=True, gated=False, weights=rw, reduce_out_dtype=torch.float32)
        return _bb(down, y, False, hidden.dtype)
    return binary(down, h, x_per_pair=True, gated=False, weights=rw, reduce_out_dtype=hidden.dtype)


def _act(z, has_gate, activation):
    act = ACTIVATIONS[activation]
    if not has_gate:
        return act(z)
    g, u = z.chunk(2, dim=-1)
    return (act(g) * u).contiguous()
