"""The plain-PyTorch kernels of packed MoBiE experts: what runs wherever no faster backend does, and the
oracle the others are tested against.

* ``torch.ops.mobie.binary_factor_mm`` — the one ±1 reference of the binary factors ``Q_{e_i} x_i``: each
  expert that has rows unpacks its signs once and runs a ±1 matmul (experts without rows are never
  touched); an opaque custom op, so ``torch.compile(fullgraph=True)`` sees one node;
* :func:`moe_binary_reference` — the one reference forward of a fused experts block: backbones where the
  algebra is cheapest (an input-side ``gate_up`` backbone once per token, an output-side ``down``
  backbone once per token after the routing-weighted sum), biases, any gating and a post-expert norm;
* :func:`moe_binary_dense_reference` — the textbook MoE on dequantized weights (tests only).

A packed weight is read through its tensors and methods (``qdata``, ``scales()``, ``backbone_input`` ...,
see :class:`~torchao_mobie.storage.MoBiETensor`); the kernels never import the storage layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import salient_slot_index, unpack_bits, unpack_signs

__all__ = ["ACTIVATIONS", "binary_factor_mm", "blockdiag_ref", "moe_binary_dense_reference", "moe_binary_reference",
           "reference_factor_mm"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


@torch.library.custom_op("mobie::binary_factor_mm", mutates_args=())
def binary_factor_mm(x: torch.Tensor, expert_ids: torch.Tensor, qdata: torch.Tensor, row_scale: torch.Tensor,
                     col_scale: torch.Tensor, qdata2: torch.Tensor | None, col_scale2: torch.Tensor | None,
                     salient: torch.Tensor | None, mean: torch.Tensor | None, qdata_x: torch.Tensor | None = None,
                     col_scale_x: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: for each expert that has rows, unpack its signs once and run a ±1 matmul.

    ``y_i = row_scale[e] * (B_e (col_scale[e] * x_i) + Σ_p X_ep (col_scale_x[e, p] * x_i)
    + B2_e (col_scale2[e] * x_i[salient_e])) + mean[e] * Σ x_i``. Experts without rows are never touched.
    """
    S, n = x.shape
    E, m = row_scale.shape
    out = torch.zeros(S, m, dtype=torch.float32, device=x.device)
    if S == 0:
        return out
    ids = expert_ids.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=E).tolist()
    idx2 = None
    if qdata2 is not None:
        s = col_scale2.shape[1]
        idx2 = salient_slot_index(unpack_bits(salient, n).bool(), s)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start:start + c]
        start += c
        xe = x[rows].float()
        B = unpack_signs(qdata[e], n)  # [m, n] ±1
        y = (xe * col_scale[e].float()) @ B.t()
        if qdata_x is not None:
            for p in range(qdata_x.shape[1]):
                y = y + (xe * col_scale_x[e, p].float()) @ unpack_signs(qdata_x[e, p], n).t()
        if qdata2 is not None:
            B2 = unpack_signs(qdata2[e], m)  # [s, m]
            y = y + (xe[:, idx2[e]] * col_scale2[e].float()) @ B2
        y = y * row_scale[e].float()
        if mean is not None:
            y = y + xe.sum(-1, keepdim=True) * mean[e].float()
        out[rows] = y
    return out


@binary_factor_mm.register_fake
def _(x, expert_ids, qdata, row_scale, col_scale, qdata2, col_scale2, salient, mean, qdata_x=None, col_scale_x=None):
    return x.new_empty((x.shape[0], row_scale.shape[1]), dtype=torch.float32)


def reference_factor_mm(w, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``Q_{e_i} x_i`` for every row of ``x [S, n]`` -> ``[S, m]`` fp32, through ``mobie::binary_factor_mm``."""
    row_scale, col_scale, col_scale2 = w.scales()
    return torch.ops.mobie.binary_factor_mm(
        x.float(), expert_ids, w.qdata, row_scale, col_scale, w.qdata2, col_scale2, w.salient, w.mean, w.qdata_x,
        w.extra_scales())


def _gate(h: torch.Tensor, has_gate: bool, activation: str) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    if not has_gate:
        return act(h)
    g, u = h.chunk(2, dim=-1)
    return act(g) * u


def _backbone_input(w, x):
    return w.backbone_input(x)


def _backbone_output(w, z):
    return w.backbone_output(z)


def _linear_pairs(w, x_tokens, token_idx, ids, ops, *, defer_output_backbone=False):
    """``W_{ids[i]} x_tokens[token_idx[i]]`` for every pair ``i``; ``x_tokens`` may be per pair
    (``token_idx`` None); ``ops``: (backbone_input, factor_mm, backbone_output)."""
    backbone_input, factor_mm, backbone_output = ops
    if w.side == "input" and token_idx is not None:
        x_tokens = backbone_input(w, x_tokens)  # once per token
        xp = x_tokens[token_idx]
    else:
        xp = x_tokens if token_idx is None else x_tokens[token_idx]
        xp = backbone_input(w, xp)
    z = factor_mm(w, xp, ids)
    if not defer_output_backbone:
        z = backbone_output(w, z)
    return z


def moe_binary_reference(hidden, top_k_index, top_k_weights, gate_up, down, *, has_gate=True, activation="silu",
                         gate_fn=None, gate_up_bias=None, down_bias=None, post_norm=None,
                         factor_mm=reference_factor_mm, backbone_input=None, backbone_output=None) -> torch.Tensor:
    """Experts output ``[T, H]`` (in ``hidden.dtype``) of packed ``gate_up [E, 2I or I, H]`` and
    ``down [E, H, I]``, computed in fp32.

    ``gate_fn`` (default: ``activation`` on the gate half times the up half, or on all of it without
    ``has_gate``) maps the ``gate_up`` output of each pair to the ``down`` input; ``gate_up_bias [E, 2I]``,
    ``down_bias [E, H]`` and ``post_norm`` (applied to each pair's ``down`` output) are optional;
    ``factor_mm(w, x, ids)`` runs the binary factors (default: the ±1 reference), ``backbone_input(w, x)`` /
    ``backbone_output(w, z)`` the backbones (default: the weight's own methods).
    """
    if gate_fn is None and activation not in ACTIVATIONS:
        raise NotImplementedError(f"moe_binary_reference: activation {activation!r} (supported: {list(ACTIVATIONS)}; "
                                  "or pass gate_fn)")
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    token_idx = torch.arange(T, device=hidden.device).repeat_interleave(k)
    w = top_k_weights.reshape(-1).float()
    x = hidden.float()

    ops = (backbone_input or _backbone_input, factor_mm, backbone_output or _backbone_output)
    h = _linear_pairs(gate_up, x, token_idx, ids, ops)
    if gate_up_bias is not None:
        h = h + gate_up_bias[ids].float()
    h = gate_fn(h) if gate_fn is not None else _gate(h, has_gate, activation)

    defer = down.side == "output" and post_norm is None  # Σ_e g_e M Q_e h_e = M Σ_e g_e Q_e h_e
    y = _linear_pairs(down, h, None, ids, ops, defer_output_backbone=defer)
    if down_bias is not None and not defer:
        y = y + down_bias[ids].float()
    if post_norm is not None:
        y = post_norm(y)
    y = (y * w[:, None]).view(T, k, y.shape[-1]).sum(1)
    if defer:
        y = ops[2](down, y)
        if down_bias is not None:
            y = y + (down_bias[ids].float() * w[:, None]).view(T, k, y.shape[-1]).sum(1)
    return y.to(hidden.dtype)


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
    """``z @ M^T`` for ``M = blockdiag(blocks)`` (int8 blocks times their per-row scale), fp32: the oracle of
    the Triton ``blockdiag_matmul``."""
    nb, kb, _ = blocks.shape
    B = blocks.float()
    if blocks_scale is not None:
        B = B * blocks_scale.float().reshape(nb, kb, 1)
    y = torch.einsum("rbj,bij->rbi", z.float().reshape(-1, nb, kb), B).reshape(z.shape[0], nb * kb)
    if gated:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    return y
