"""Turning MoBiE's explicit representation into packed :class:`MoBiETensor` parameters."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..integrations.transformers import PROJECTIONS, experts_info, is_experts_module
from .mobie_tensor import MoBiETensor

__all__ = ["FACTORS_ATTR", "binarize_experts_data_free", "check_packable", "check_targets_packable", "finish_if_packed",
           "finish_packed", "pack_experts", "pack_model", "pack_projection", "packs", "is_packed", "unpack_model"]

# experts-module attribute ``{projection: CEJDFactors}`` where a quantization run leaves MoBiE's stored form
# (``BinarizedExperts.factors``) until the projection is packed
FACTORS_ATTR = "_mobie_factors"


def binarize_experts_data_free(model: nn.Module, quantize) -> dict:
    """Binarize every experts projection with identity Hessians and write the fake-quant weights back.

    ``quantize(W [E, out, in] fp32, H [E, in, in], fqn, projection)`` returns anything with a ``weight``;
    the results are returned as ``{param fqn: result}``. Storage only depends on the weights, so this is
    how memory is measured without calibration data.
    """
    out = {}
    for fqn, m in model.named_modules():
        if not is_experts_module(m):
            continue
        info = experts_info(m, fqn)
        for p in PROJECTIONS:
            W = info.weight(p).detach().float()
            E, _, n = W.shape
            res = quantize(W, torch.eye(n).repeat(E, 1, 1), f"{fqn}.{p}", p)
            info.set_weight(p, res.weight)
            out[f"{fqn}.{p}"] = res
    return out


def is_packed(model: nn.Module) -> bool:
    """True when at least one experts weight of ``model`` is a :class:`MoBiETensor`."""
    return any(isinstance(p, MoBiETensor) for p in model.parameters())


def _find_factors(module: nn.Module, projection: str):
    return (getattr(module, FACTORS_ATTR, {}) or {}).get(projection)


def check_packable(module: nn.Module, name: str = "") -> None:
    """Raise (naming the module) for an experts layout :class:`MoBiETensor` cannot hold; called before a
    packing quantization run changes any weight."""
    if getattr(module, "is_transposed", False):
        raise NotImplementedError(f"{name or type(module).__name__}: packing transposed experts weights "
                                  "(is_transposed=True, e.g. GPT-OSS) is not supported; quantize with "
                                  "MoBiEConfig(packed=False) for fake-quant weights")


def packs(config) -> bool:
    """A quantization run with ``config`` leaves MoBiETensor experts: ``MoBiEConfig(packed=True)`` (the default)
    with the routed experts in scope; the baselines have no packed format."""
    return bool(getattr(config, "packed", False)) and "routed_experts" in getattr(config, "scope", ())


def check_targets_packable(targets, config) -> None:
    """:func:`check_packable` on every experts module of ``[(fqn, module, params)]`` when ``config`` packs."""
    if packs(config):
        for fqn, module, _ in targets:
            if is_experts_module(module):
                check_packable(module, fqn)


def pack_projection(module: nn.Module, projection: str, name: str = "", *, check: bool = True) -> bool:
    """Pack ``module.<projection>`` from the representation the quantization run left on the module (and
    drop it there); False when there is none or the projection is already packed."""
    factors = _find_factors(module, projection)
    if factors is None or isinstance(getattr(module, projection), MoBiETensor):
        return False
    pack_experts(module, projection, factors, check=check, name=name)
    getattr(module, FACTORS_ATTR).pop(projection, None)
    return True


def finish_if_packed(model: nn.Module) -> None:
    """:func:`finish_packed` when some experts weight of ``model`` is packed (after ``quantize_``)."""
    if is_packed(model):
        finish_packed(model)


def finish_packed(model: nn.Module, *, experts_implementation: str | None = "mobie",
                  attach_hf_quantizer: bool = True) -> None:
    """What a model with packed experts needs around them: the experts implementation, ``storage="packed"``
    in the quantization marker and the ``"mobie"`` HF quantizer (``save_pretrained`` writes the packed format)."""
    if experts_implementation is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts_implementation)
    from ..api import MARKER, quantization_marker

    entries = quantization_marker(model)
    if entries and hasattr(model, "config"):
        setattr(model.config, MARKER, [dict(e, storage="packed") if "routed_experts" in e.get("scope", ()) else e
                                       for e in entries])
    if attach_hf_quantizer and hasattr(model, "config"):
        from ..integrations.hf_quantizer import attach_quantizer

        attach_quantizer(model)


@torch.no_grad()
def pack_experts(module: nn.Module, projection: str, factors, *, check: bool = True, name: str = "") -> MoBiETensor:
    """Replace ``module.<projection>`` by the packed weight built from ``factors`` (:class:`CEJDFactors` or its
    dict form, see :meth:`MoBiETensor.from_parts`).

    check: the packed weight's :meth:`~MoBiETensor.dequantize` must equal the module's current
    (fake-quant) weight bit for bit; a mismatch raises (factors and weight are from different runs).
    """
    check_packable(module, name)
    old = getattr(module, projection)
    if isinstance(old, MoBiETensor):
        raise RuntimeError(f"{name}.{projection} is already packed")
    t = MoBiETensor.from_parts(factors, dtype=old.dtype)
    if tuple(t.shape) != tuple(old.shape):
        raise ValueError(f"{name}.{projection}: the factors describe {list(t.shape)}, the parameter is {list(old.shape)}")
    t = t.to(old.device)
    if check:
        deq = t.dequantize()
        if not torch.equal(deq, old.detach()):
            diff = (deq.float() - old.detach().float()).abs().max().item()
            raise ValueError(f"{name}.{projection}: the packed representation does not reproduce the module's weight "
                             f"(max abs diff {diff:.3g}); the factors belong to another quantization run")
    setattr(module, projection, nn.Parameter(t, requires_grad=False))
    return t


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


@torch.no_grad()
def unpack_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`MoBiETensor` parameter by its dequantized (fake-quant) weight, in place.

    The result is the fake-quant model bit for bit (in the packed tensor's logical dtype unless ``dtype``)."""
    for _, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, MoBiETensor):
                setattr(module, name, nn.Parameter(p.dequantize(dtype or p.dtype), requires_grad=False))
    if getattr(getattr(model, "config", None), "_experts_implementation", None) == "mobie" \
            and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm")
    return model
