"""Plain-PyTorch reference of the fused binary MoE (CPU path and test oracle).

Two levels:

* :func:`moe_binary_dense_reference` — dequantizes every selected expert weight with
  :meth:`MoBiETensor.dequantize` and runs the textbook MoE (obviously correct; ``O(P·m·n)`` memory,
  tests only);
* :func:`moe_binary_reference` — the same algebra and backbone placement as the kernels, in fp32
  PyTorch: the binary factors through the packed tensor's one ±1 reference
  (:meth:`MoBiETensor.factor_mm`), the backbones through ``blockdiag_ref``; used on CPU and wherever
  Triton cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["moe_binary_dense_reference", "moe_binary_reference", "blockdiag_ref",
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


def _pairs(x, ids, w):
    """``Q_{ids[i]} x_i`` per row: the packed tensor's one ±1 reference (``mobie::binary_factor_mm``)."""
    return w.factor_mm(x.float().contiguous(), ids)


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
