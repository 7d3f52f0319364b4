"""Fused binary MoE kernels for packed MoBiE experts (Triton; PyTorch reference on CPU).

Entry point for the experts path (``integrations/experts.py`` or the lead)::

    from torchao_mobie.kernels import fused_moe_binary
    y = fused_moe_binary(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                         has_gate=experts.has_gate, activation="silu")   # [T, H] in hidden_states.dtype

It covers the layouts with ``is_transposed=False``, ``is_concatenated=True``, ``has_bias=False`` and no
post-expert norm; callers keep their own path for the others. Ops: ``torch.ops.mobie_kernels.
{binary_moe_gemv, binary_moe_gemm, blockdiag_matmul}`` (see :mod:`.ops`).
"""

from .align import max_padded_slots, moe_align_block_size
from .fused import GEMV_MAX_PAIRS, fused_moe_binary, salient_index_i32, triton_available, triton_usable
from .reference import moe_binary_dense_reference, moe_binary_reference


# ---- hook for the "mobie" experts implementation ------------------------------------------------
def experts_forward_supported(experts_module) -> bool:
    """True when :func:`fused_moe_binary` handles this experts module's layout (else use the generic path)."""
    from ..storage.mobie_tensor import MoBiETensor

    m = experts_module
    up = getattr(m, "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj", None)
    return (isinstance(up, MoBiETensor) and isinstance(getattr(m, "down_proj", None), MoBiETensor)
            and not getattr(m, "is_transposed", False) and getattr(m, "is_concatenated", True)
            and not getattr(m, "has_bias", False) and not getattr(m, "has_post_expert_norm", False)
            and _activation_name(m) is not None)


def _activation_name(m) -> str | None:
    import torch.nn as nn
    import torch.nn.functional as F

    act = getattr(m, "act_fn", None)
    if isinstance(act, nn.SiLU) or act is F.silu:
        return "silu"
    name = type(act).__name__
    return {"SiLUActivation": "silu", "ReLU": "relu", "GELUActivation": "gelu",
            "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}.get(name)


def mobie_fused_experts_forward(experts_module, hidden_states, top_k_index, top_k_weights):
    """Drop-in ``ExpertsInterface`` forward for supported layouts (see :func:`experts_forward_supported`)."""
    m = experts_module
    up = m.gate_up_proj if m.has_gate else m.up_proj
    return fused_moe_binary(hidden_states, top_k_index, top_k_weights, up, m.down_proj, has_gate=m.has_gate,
                            activation=_activation_name(m))


MOBIE_TRITON_EXPERTS = "mobie_triton"


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if experts_forward_supported(self):
        return mobie_fused_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    from ..integrations.experts import mobie_experts_forward

    return mobie_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation(name: str = MOBIE_TRITON_EXPERTS) -> str:
    """Register :func:`fused_moe_binary` as a transformers experts implementation (idempotent); layouts it
    does not cover go to the ``"mobie"`` implementation of ``integrations/experts.py``. Returns the name
    (``model.set_experts_implementation(name)``)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, _experts_forward)
    return name


__all__ = ["MOBIE_TRITON_EXPERTS", "register_experts_implementation", "GEMV_MAX_PAIRS", "experts_forward_supported", "fused_moe_binary", "max_padded_slots",
           "mobie_fused_experts_forward", "moe_align_block_size", "moe_binary_dense_reference",
           "moe_binary_reference", "salient_index_i32", "triton_available", "triton_usable"]
