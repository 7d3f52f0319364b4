"""The ``"mobie"`` experts implementation for transformers' ``ExpertsInterface``.

``model.set_experts_implementation("mobie")`` (set by packing and by ``from_pretrained`` of a packed
checkpoint) routes every fused experts module through :func:`mobie_experts_forward`, which hands the packed
weights to the kernel dispatch (:func:`~torchao_mobie.kernels.dispatch.moe_experts`): the fused Triton
kernels on a GPU, the PyTorch reference elsewhere, with no graph break under ``torch.compile``. Modules
whose weights are not :class:`~torchao_mobie.storage.MoBiETensor` fall back to transformers' ``grouped_mm``.

Every layout of the interface runs: the kernels read the packed data, always ``[E, out, in]`` (a transposed
module's parameters are transposed views of it); biases (kept as plain parameters in their own dtype) and a
gating other than ``act(gate) * up`` on concatenated halves (gpt_oss: interleaved gate/up, clamped
``(up + 1) * gate * sigmoid(alpha * gate)``) go to the reference block forward, which adds the biases to the
fp32 factor products and calls the module's own ``_apply_gate``.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..kernels.dispatch import moe_experts
from ..storage.mobie_tensor import MoBiETensor

__all__ = ["MOBIE_EXPERTS", "activation_name", "mobie_experts_forward"]

MOBIE_EXPERTS = "mobie"

_ACTIVATION_CLASSES = {"SiLUActivation": "silu", "ReLU": "relu", "GELUActivation": "gelu", "PytorchGELUTanh": "gelu_tanh",
                       "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}


def activation_name(module) -> str | None:
    """The kernels' name of the module's gating when it is ``act(gate) * up`` on concatenated halves (or
    ``act`` alone without a gate), else None (the module's own gating runs)."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(module, "has_gate", True) and (not getattr(module, "is_concatenated", True)
                                              or getattr(type(module), "_apply_gate", None) is not _default_apply_gate):
        return None
    act = getattr(module, "act_fn", None)
    if isinstance(act, nn.SiLU) or act is F.silu:
        return "silu"
    return _ACTIVATION_CLASSES.get(type(act).__name__)


def mobie_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    if not (isinstance(up, MoBiETensor) and isinstance(down, MoBiETensor)):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("the 'mobie' experts implementation does not support expert parallelism")
    return moe_experts(hidden_states, top_k_index, top_k_weights, up, down, has_gate=self.has_gate,
                       activation=activation_name(self),
                       gate_fn=self._apply_gate if self.has_gate else self.act_fn,
                       gate_up_bias=getattr(self, f"{up_name}_bias") if self.has_bias else None,
                       down_bias=self.down_proj_bias if self.has_bias else None,
                       post_norm=self.post_expert_norm if self.has_post_expert_norm else None)
