"""The ``"mobie"`` experts implementation for transformers' ``ExpertsInterface``.

``model.set_experts_implementation("mobie")`` (or ``from_pretrained(..., experts_implementation="mobie")``)
routes every fused experts module through :func:`mobie_experts_forward`:

* the binary factors run through one opaque op per projection (``torch.ops.mobie.binary_factor_mm``:
  signs of the experts that received tokens are unpacked once and used as a ±1 matmul; unused experts
  are never touched), so ``torch.compile(experts, fullgraph=True)`` sees no graph break;
* the shared backbone is applied where the algebra is cheapest: an input-side ``gate_up_proj``
  backbone once per token before the expert matmuls (``Q_e (S x)``: ``S x`` is shared by the k experts
  of the token), an output-side ``down_proj`` backbone once per token after the routing-weighted sum
  (``Σ_e g_e M Q_e h_e = M Σ_e g_e Q_e h_e``), the others as one GEMM over all (token, expert) pairs.

On CPU inside a ``torch.compile`` trace the three products run through :mod:`torchao_mobie.kernels.cpu`
(unpacking, scales and reduction fused by inductor; ``kernel_ops``), elsewhere through the reference methods.
Everything is computed in fp32 and cast to the activation dtype at the end. Modules whose weights are
not :class:`~torchao_mobie.storage.MoBiETensor` fall back to transformers' ``grouped_mm`` forward.
"""

from __future__ import annotations

import torch

__all__ = ["MOBIE_EXPERTS", "mobie_experts_forward", "register_experts_implementation"]

MOBIE_EXPERTS = "mobie"


# ---- kernel choice (issue 19): the fused CPU kernels inside a torch.compile trace on CPU ---------------
def _reference_ops():
    from ..storage.mobie_tensor import MoBiETensor

    return MoBiETensor.backbone_input, MoBiETensor.factor_mm, MoBiETensor.backbone_output


def kernel_ops(x: torch.Tensor):
    """``(backbone_input, factor_mm, backbone_output)``, each called as ``f(weight, ...)``: the CPU kernels of
    :mod:`torchao_mobie.kernels.cpu` when ``x`` is on the CPU inside a ``torch.compile`` trace, else the packed
    tensor's reference methods (``MoBiETensor.factor_mm`` = ``torch.ops.mobie.binary_factor_mm``)."""
    from ..kernels import cpu

    if cpu.use_cpu_path(x):
        return cpu.cpu_backbone_input, cpu.cpu_factor_mm, cpu.cpu_backbone_output
    return _reference_ops()
# ------------------------------------------------------------------------------------------------------


def _linear_pairs(w, x_tokens, token_idx, ids, *, defer_output_backbone=False, ops=None):
    """``W_{ids[i]} x_tokens[token_idx[i]]`` for every pair ``i``; ``x_tokens`` may be per pair
    (``token_idx`` None)."""
    backbone_input, factor_mm, backbone_output = ops or _reference_ops()
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


def mobie_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    from ..storage.mobie_tensor import MoBiETensor

    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    if not (isinstance(up, MoBiETensor) and isinstance(down, MoBiETensor)):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.is_transposed:
        raise NotImplementedError(f"{type(self).__name__}: the 'mobie' experts implementation does not support "
                                  "transposed expert weights (is_transposed=True)")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("the 'mobie' experts implementation does not support expert parallelism")
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    token_idx = torch.arange(T, device=hidden_states.device).repeat_interleave(k)
    w = top_k_weights.reshape(-1).float()
    x = hidden_states.float()

    ops = kernel_ops(x)
    h = _linear_pairs(up, x, token_idx, ids, ops=ops)
    if self.has_bias:
        h = h + getattr(self, f"{up_name}_bias")[ids].float()
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)

    defer = down.side == "output" and not self.has_post_expert_norm
    y = _linear_pairs(down, h, None, ids, defer_output_backbone=defer, ops=ops)
    if self.has_bias and not defer:
        y = y + self.down_proj_bias[ids].float()
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    y = (y * w[:, None]).view(T, k, -1).sum(1)
    if defer:
        y = ops[2](down, y)
        if self.has_bias:
            y = y + (self.down_proj_bias[ids].float() * w[:, None]).view(T, k, -1).sum(1)
    return y.to(hidden_states.dtype)


def _grouped_mm_fallback_on_packed(func, types, args, kwargs):
    from ..storage.mobie_tensor import packed_grouped_mm

    x, w = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs["offs"]
    return packed_grouped_mm(x, w, offs)


def register_experts_implementation() -> None:
    """Register ``"mobie"`` with transformers' global ``ExpertsInterface`` (idempotent), and teach
    :class:`MoBiETensor` transformers' ``grouped_mm_fallback`` op (used by the grouped_mm path under
    torch.compile for non-bf16 weights)."""
    import transformers.integrations.moe as moe

    from ..storage.mobie_tensor import MoBiETensor

    moe.ExpertsInterface.register(MOBIE_EXPERTS, mobie_experts_forward)
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if op is not None:
        MoBiETensor.implements(op.default)(_grouped_mm_fallback_on_packed)
