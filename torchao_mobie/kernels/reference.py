"""Plain-PyTorch reference of the fused binary MoE (CPU path and test oracle).

Two levels:

* :func:`moe_binary_dense_reference` — dequantizes every selected expert weight with
  :meth:`MoBiETensor.dequantize` and runs the textbook MoE (obviously correct; ``O(P·m·n)`` memory,
  tests only);
* :func:`moe_binary_reference` — the same algebra as the kernels, in fp32 PyTorch, built from
  helper ops that mirror the Triton ones one to one (``binary_gemv_ref``, ``blockdiag_ref``); used on
  CPU and wherever Triton cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..storage.packing import unpack_signs

__all__ = ["moe_binary_dense_reference", "moe_binary_reference", "binary_pairs_ref", "blockdiag_ref",
           "ACTIVATIONS"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def _gate(h: torch.Tensor, has_gate: bool, activation: str) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    if not has_gate:
        return act(h)
    g, u = h.chunk(2, dim=-1)
    return act(g) * u


def moe_binary_dense_reference(hidden, top_k_index, top_k_weights, gate_up, down, *, has_gate=True,
                               activation="silu") -> torch.Tensor:
    """Textbook MoE with dequantized weights (fp32), cast to ``hidden.dtype``."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1).long()
    x = hidden.float().repeat_interleave(k, dim=0)  # [P, H]
    W1 = gate_up.dequantize(torch.float32, experts=ids)  # [P, m1, H]
    h = _gate(torch.einsum("pmn,pn->pm", W1, x), has_gate, activation)
    W2 = down.dequantize(torch.float32, experts=ids)
    y = torch.einsum("pmn,pn->pm", W2, h) * top_k_weights.reshape(-1, 1).float()
    return y.view(T, k, y.shape[-1]).sum(1).to(hidden.dtype)


def blockdiag_ref(z: torch.Tensor, blocks: torch.Tensor, blocks_scale: torch.Tensor | None = None,
                  gated: bool = False) -> torch.Tensor:
    """``z @ M^T`` for ``M = blockdiag(blocks)`` (int8 blocks times their per-row scale), fp32."""
    nb, kb, _ = blocks.shape
    B = blocks.float()
    if blocks_scale is not None:
        B = B * blocks_scale.float().reshape(nb, kb, 1)
    y = torch.einsum("rbj,bij->rbi", z.float().reshape(-1, nb, kb), B).reshape(z.shape[0], nb * kb)
    if gated:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    return y


def binary_pairs_ref(x, ids, w, salient_idx=None) -> torch.Tensor:
    """``Q_{ids[i]} x_i`` for every row (``x [P, n]`` fp32), exactly the kernels' algebra:
    ``row_scale ⊙ (B (x ⊙ col_scale) + B2 (x[sal] ⊙ col_scale2)) + mean · Σx``. Unpacks only the
    experts that are used (one loop iteration per distinct expert: host sync, reference only)."""
    P, n = x.shape
    E, m = w.row_scale.shape
    out = torch.zeros(P, m, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero().squeeze(-1)
        xe = x[rows].float()
        y = (xe * w.col_scale[e].float()) @ unpack_signs(w.qdata[e], n).t()
        if w.qdata2 is not None:
            y = y + (xe[:, salient_idx[e].long()] * w.col_scale2[e].float()) @ unpack_signs(w.qdata2[e], m)
        y = y * w.row_scale[e].float()
        if w.mean is not None:
            y = y + xe.sum(-1, keepdim=True) * w.mean[e].float()
        out[rows] = y
    return out


@torch.library.custom_op("mobie_kernels::binary_pairs_ref", mutates_args=())
def _binary_pairs_op(x: torch.Tensor, ids: torch.Tensor, qdata: torch.Tensor, row_scale: torch.Tensor,
                     col_scale: torch.Tensor, mean: torch.Tensor | None, qdata2: torch.Tensor | None,
                     col_scale2: torch.Tensor | None, salient_idx: torch.Tensor | None) -> torch.Tensor:
    """Opaque wrapper of :func:`binary_pairs_ref` (its per-expert loop syncs; opaque keeps compile whole)."""
    from types import SimpleNamespace

    w = SimpleNamespace(qdata=qdata, row_scale=row_scale, col_scale=col_scale, mean=mean, qdata2=qdata2,
                        col_scale2=col_scale2)
    return binary_pairs_ref(x, ids, w, salient_idx)


@_binary_pairs_op.register_fake
def _(x, ids, qdata, row_scale, col_scale, mean, qdata2, col_scale2, salient_idx):
    return x.new_empty((x.shape[0], row_scale.shape[1]), dtype=torch.float32)


def _pairs(x, ids, w):
    from .fused import salient_index_i32

    return _binary_pairs_op(x.float().contiguous(), ids, w.qdata, w.row_scale, w.col_scale, w.mean, w.qdata2,
                            w.col_scale2, salient_index_i32(w))


def _backbone(w, z, gated=False):
    return blockdiag_ref(z, w.backbone, w.backbone_scale, gated=gated)


def moe_binary_reference(hidden, top_k_index, top_k_weights, gate_up, down, *, has_gate=True,
                         activation="silu") -> torch.Tensor:
    """Structured fp32 reference with the same backbone placement as the fused kernels."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1).long()
    rw = top_k_weights.reshape(-1, 1).float()
    x = hidden.float()
    if gate_up.side == "input":
        x = _backbone(gate_up, x)  # once per token
    z = _pairs(x.repeat_interleave(k, dim=0), ids, gate_up)
    if gate_up.side == "output":
        z = _backbone(gate_up, z)
    h = _gate(z, has_gate, activation)
    if down.side == "input":
        h = _backbone(down, h)
    y = _pairs(h, ids, down) * rw
    y = y.view(T, k, y.shape[-1]).sum(1)
    if down.side == "output":
        y = _backbone(down, y)  # once per token, after the weighted sum
    return y.to(hidden.dtype)
