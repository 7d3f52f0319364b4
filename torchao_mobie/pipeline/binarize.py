"""Binarizing one parameter, shared by the sequential pipeline and the torchao handler: the method runs on
fp32 weights and Hessians (with one ridge retry for Hessians no damping fixes), the fake-quant weight is
written back, MoBiE's stored form is kept for packing, and a record is left on the module."""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ..algorithms.factors import CEJDFactors
from ..algorithms.fp_target import fp_target_weight
from ..calibration import ExpertHessians, RouterInputStats
from ..integrations.transformers import ExpertsInfo
from ..methods.base import BinarizationConfig, BinarizedExperts, QuantContext
from ..storage.convert import FACTORS_ATTR
from .guards import check_finite_hessian, finite_or_raise
from .report import BinarizationRecord, records_of

__all__ = ["apply_experts", "apply_linear", "fp_target_refit", "quantize_with_ridge_fallback", "routing_weighted",
           "warn_data_free"]

logger = logging.getLogger("torchao_mobie")

_DATA_FREE_WARNED: dict[int, weakref.ref] = {}


def warn_data_free(config: BinarizationConfig, what: str) -> None:
    ref = _DATA_FREE_WARNED.get(id(config))
    if ref is not None and ref() is config:
        logger.debug("%s: data-free binarization of %s", type(config).__name__, what)
        return
    for key in [k for k, r in _DATA_FREE_WARNED.items() if r() is None]:
        del _DATA_FREE_WARNED[key]
    _DATA_FREE_WARNED[id(config)] = weakref.ref(config)
    logger.warning(
        "%s: no calibration statistics observed (first: %s): binarizing data-free with an identity Hessian, so "
        "without activation-aware saliency (salient columns chosen by weight magnitude) and without error "
        "compensation across columns. For calibrated binarization run step='observe', then calibration batches, "
        "then step='convert', or use torchao_mobie.quantize_model(model, config, calibration).",
        type(config).__name__, what)


def _not_positive_definite(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.linalg.LinAlgError) or "positive definite" in msg or "singular" in msg


def quantize_with_ridge_fallback(run, h: torch.Tensor, name: str, config: BinarizationConfig):
    """``run(h)``; when the method finds ``h`` not positive definite even after its own damping, retry
    once with ``h + mean(diag h)·I`` per matrix (a strong ridge: between calibrated and data-free), with
    a warning. Sums of outer products are PSD, so this only happens for numerically degenerate inputs
    (rank-deficient Hessians from repetitive calibration text, with a method that does not damp them
    enough); failing the whole run there would waste every layer already done."""
    try:
        return run(h)
    except (ValueError, RuntimeError) as e:
        if not _not_positive_definite(e):
            raise
        first = e
    diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    diag = torch.where(diag > 0, diag, torch.ones_like(diag))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    ridge = h + (diag[..., None, None] if h.dim() == 3 else diag) * eye
    logger.warning("%s: %s found the calibration Hessian not positive definite even after damping (%s); falling "
                   "back to H + mean(diag H)·I for this parameter", name, type(config).__name__, first)
    try:
        return run(ridge)
    except (ValueError, RuntimeError) as e:
        if not _not_positive_definite(e):
            raise
        raise ValueError(
            f"{name}: {type(config).__name__} cannot binarize this parameter: its calibration Hessian is not positive "
            f"definite even after damping ({first}), nor after adding mean(diag H)·I ({e}). Use more (and more "
            "varied) calibration samples or a larger percdamp") from e


def apply_experts(info: ExpertsInfo, projection: str, hess: ExpertHessians | None, config: BinarizationConfig,
                   name: str, router_stats: RouterInputStats | None = None, guided_hessian: torch.Tensor | None = None,
                   downstream_routers: list | None = None, judge=None, plan_memory=None) -> BinarizationRecord:
    w = info.weight(projection).detach().float()
    e, _, d = w.shape
    w_fit = None
    if hess is not None and hess.cross is not None:  # fit the full-precision model's outputs (fp_target)
        hq, n = hess.fit_hessian
        few = set(hess.fallback_experts) | set((n < config.min_expert_tokens).nonzero().flatten().tolist())
        w_fit = fp_target_weight(w, hq, hess.cross, config.fp_target_ridge, skip=few)
        # the candidates of a held-back selection are fit on the tokens not held back, so to that target; the
        # final fit uses every token (select_refit), so the target over every token where it was collected
        # (fp_target_refit)
        w = w_fit if hess.cross_all is None else \
            fp_target_weight(w, hess.hessian, hess.cross_all, config.fp_target_ridge, skip=few)
    if hess is None:
        h3d = torch.eye(d, device=w.device).repeat(e, 1, 1)
        ctx = QuantContext(name=name, projection=projection, data_free=True, router_stats=router_stats)
    else:
        h3d = hess.hessian
        ctx = QuantContext(name=name, projection=projection, token_counts=hess.counts,
                           fallback_experts=hess.fallback_experts, router_stats=router_stats,
                           guided_hessian=guided_hessian, downstream_routers=list(downstream_routers or []),
                           calibration_split=hess.split, judge=judge, sibling_bits=_sibling_bits(info, projection),
                           plan_memory=plan_memory, fit_weight=None if w_fit is w else w_fit)
    if hess is None:
        res = config.quantize_experts(w, h3d, context=ctx)
    else:
        check_finite_hessian(h3d, name)
        res = quantize_with_ridge_fallback(lambda h: config.quantize_experts(w, h, context=ctx), h3d, name, config)
    if not isinstance(res, BinarizedExperts):
        res = BinarizedExperts(*res)
    if tuple(res.weight.shape) != tuple(w.shape):
        raise ValueError(f"{type(config).__name__}.quantize_experts returned {list(res.weight.shape)} for {name}, "
                         f"expected {list(w.shape)}")
    finite_or_raise(res.weight, name)
    info.set_weight(projection, res.weight)
    if isinstance(res.factors, CEJDFactors):  # the stored form (MoBiE), kept for packing (torchao_mobie.storage)
        store = getattr(info.module, FACTORS_ATTR, None)
        if store is None:
            store = {}
            setattr(info.module, FACTORS_ATTR, store)
        store[projection] = res.factors
    rec = BinarizationRecord(config=type(config).__name__, bits=res.bits, data_free=hess is None,
                             fallback_experts=[] if hess is None else hess.fallback_experts)
    records_of(info.module)[projection] = rec
    return rec


def _sibling_bits(info: ExpertsInfo, projection: str) -> float | None:
    rec = records_of(info.module).get("gate_up_proj") if projection == "down_proj" else None
    return None if rec is None else rec.bits.all_inclusive_bits


def apply_linear(module: nn.Linear, hessian: torch.Tensor | None, config: BinarizationConfig,
                  name: str) -> BinarizationRecord:
    w = module.weight.detach().float()
    data_free = hessian is None
    if data_free:
        hessian = torch.eye(module.in_features, device=w.device)
    ctx = QuantContext(name=name, projection="weight", data_free=data_free)
    if data_free:
        res = config.quantize_linear(w, hessian, context=ctx)
    else:
        check_finite_hessian(hessian, name)
        res = quantize_with_ridge_fallback(lambda h: config.quantize_linear(w, h, context=ctx), hessian, name, config)
    if tuple(res.weight.shape) != tuple(w.shape):
        raise ValueError(f"{type(config).__name__}.quantize_linear returned {list(res.weight.shape)} for {name}, "
                         f"expected {list(w.shape)}")
    finite_or_raise(res.weight, name)
    with torch.no_grad():
        module.weight.data.copy_(res.weight.to(module.weight.dtype))
    rec = BinarizationRecord(config=type(config).__name__, bits=res.bits, data_free=data_free)
    records_of(module)["weight"] = rec
    return rec


def fp_target_refit(config, num_experts: int) -> bool:
    """Whether the final fit of a layer with ``num_experts`` gets the full-precision target over every token
    (``MoBiEConfig.fp_target_refit``; None: layers with 16 or more experts)."""
    refit = getattr(config, "fp_target_refit", None)
    return num_experts >= 16 if refit is None else bool(refit)


def routing_weighted(config) -> bool:
    return bool(getattr(config, "route_weighted", False))
