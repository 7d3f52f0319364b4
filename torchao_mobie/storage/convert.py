"""Module-level conversions between MoBiE's stored form (:class:`~torchao_mobie.algorithms.factors.CEJDFactors`)
and packed :class:`MoBiETensor` parameters; the model-level finish (experts implementation, HF quantizer)
is :mod:`.packed_model`."""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.transformers import PROJECTIONS, experts_info, is_experts_module
from .mobie_tensor import MoBiETensor

__all__ = ["FACTORS_ATTR", "binarize_experts_data_free", "check_packable", "check_targets_packable", "is_packed",
           "pack_experts", "pack_projection", "packs", "unpack_model"]

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
    packing quantization run changes any weight.

    Every layout :func:`~torchao_mobie.integrations.transformers.experts_info` reads is packable: the packed
    data is always in the ``[E, out, in]`` orientation, and a transposed module (``[E, in, out]``: gpt_oss,
    llama4) gets a transposed view of it as its parameter, of the parameter's own shape. Any other layout is
    rejected here with :class:`~torchao_mobie.integrations.transformers.UnsupportedMoELayoutError`."""
    experts_info(module, name)


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


@torch.no_grad()
def pack_experts(module: nn.Module, projection: str, factors, *, check: bool = True, name: str = "") -> MoBiETensor:
    """Replace ``module.<projection>`` by the packed weight built from ``factors`` (:class:`CEJDFactors` or its
    dict form, see :meth:`MoBiETensor.from_parts`; always ``[E, out, in]``, transposed to the parameter's
    ``[E, in, out]`` for ``is_transposed`` layouts).

    check: the packed weight's :meth:`~MoBiETensor.dequantize` must equal the module's current
    (fake-quant) weight bit for bit; a mismatch raises (factors and weight are from different runs).
    """
    transposed = experts_info(module, name).is_transposed
    old = getattr(module, projection)
    if isinstance(old, MoBiETensor):
        raise RuntimeError(f"{name}.{projection} is already packed")
    t = MoBiETensor.from_parts(factors, dtype=old.dtype)  # [E, out, in]
    if transposed:  # the parameter is [E, in, out]: a transposed view of the same packed data
        t = t.transpose(-2, -1)
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
