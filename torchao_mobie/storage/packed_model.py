"""A model with packed experts: packing every binarized projection and what the model needs around them
(the ``"mobie"`` experts implementation, ``storage="packed"`` in its marker, the ``"mobie"`` HF quantizer so
``save_pretrained`` writes the packed format)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..integrations.transformers import PROJECTIONS, is_experts_module
from ..marker import mark_packed
from .convert import FACTORS_ATTR, is_packed, pack_experts, pack_projection
from .hf_quantizer import attach_quantizer, set_experts_implementation
from .mobie_tensor import MoBiETensor

__all__ = ["finish_if_packed", "finish_packed", "pack_model"]


def finish_if_packed(model: nn.Module) -> None:
    """:func:`finish_packed` when some experts weight of ``model`` is packed (after ``quantize_``)."""
    if is_packed(model):
        finish_packed(model)


def finish_packed(model: nn.Module, *, experts_implementation: str | None = "mobie",
                  attach_hf_quantizer: bool = True) -> None:
    """What a model with packed experts needs around them: the experts implementation, ``storage="packed"``
    in the quantization marker and the ``"mobie"`` HF quantizer (``save_pretrained`` writes the packed format)."""
    set_experts_implementation(model, experts_implementation)
    mark_packed(model)
    if attach_hf_quantizer and hasattr(model, "config"):
        attach_quantizer(model)


def pack_model(model: nn.Module, factors: Mapping[str, object] | None = None, *,
               experts_implementation: str | None = "mobie", check: bool = True,
               attach_hf_quantizer: bool = True) -> nn.Module:
    """Convert every binarized experts projection of ``model`` to :class:`MoBiETensor` (in place).

    factors: optional ``{"<experts fqn>.<projection>": factors}`` (:class:`CEJDFactors` or the dict form);
        otherwise the stored form left on the experts modules by the quantization run
        (``module._mobie_factors[projection]``). Projections without one (fake-quant baselines such as BiLLM,
        ARB-LLM, sign) stay as they are; if nothing can be packed (and nothing is packed already) a ValueError
        says so. Projections already packed (``MoBiEConfig()`` packs when it quantizes) are skipped, so calling
        it on a packed model only sets what :func:`finish_packed` sets.
    experts_implementation: switch the model to this experts implementation (None = keep).
    attach_hf_quantizer: attach the ``"mobie"`` HF quantizer/config so ``save_pretrained`` writes the
        packed format.
    """
    factors = dict(factors or {})
    packed = []
    for fqn, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for proj in PROJECTIONS:
            key = f"{fqn}.{proj}" if fqn else proj
            p = factors.pop(key, None)
            if isinstance(getattr(module, proj), MoBiETensor):
                continue
            if p is not None:
                pack_experts(module, proj, p, check=check, name=fqn)
                getattr(module, FACTORS_ATTR, {}).pop(proj, None)
            elif not pack_projection(module, proj, fqn, check=check):
                continue
            packed.append(key)
    if factors:
        raise KeyError(f"pack_model: no experts parameter named {sorted(factors)}")
    if not packed and not is_packed(model):
        raise ValueError("pack_model: no experts weight has an explicit binary representation to pack (looked for "
                         f"module.{FACTORS_ATTR}[projection]). Only MoBiEConfig produces one "
                         "(BinarizedExperts.factors); the BiLLM / ARB-LLM / sign baselines are fake-quant only. "
                         "Pass factors={'<experts fqn>.<projection>': factors} to pack a representation built elsewhere")
    finish_packed(model, experts_implementation=experts_implementation, attach_hf_quantizer=attach_hf_quantizer)
    return model
