"""Everything checked before a weight changes, so bad input leaves the model as it was: binarized or
packed twice, non-finite weights or Hessians, a layout that cannot be packed, observe/convert with two
configs, router alignment asked of a flow that cannot run it."""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.transformers import PROJECTIONS, ExpertsInfo, LinearInfo, is_experts_module
from ..marker import MARKER, quantization_marker
from ..storage.convert import check_targets_packable as check_packable
from ..storage.mobie_tensor import MoBiETensor
from .report import OBSERVED_WITH, RECORDS, module_name

__all__ = ["check_finite_hessian", "check_finite_weights", "check_no_router_align", "check_not_binarized", "check_not_packed",
           "check_not_requantizing", "check_packable", "check_same_config", "finite_or_raise", "targets_of"]


def check_not_binarized(module: nn.Module, params) -> None:
    recs = getattr(module, RECORDS, {})
    for p in params:
        if p in recs:
            raise RuntimeError(
                f"{module_name(module)}.{p} is already binarized (by {recs[p].config}); binarizing binary weights again "
                "is not supported: reload the full-precision weights to quantize with another config")


def check_not_packed(targets: list[tuple[str, nn.Module, tuple]]) -> None:
    for fqn, module, params in targets:
        for p in params:
            if isinstance(getattr(module, p, None), MoBiETensor):
                raise RuntimeError(
                    f"{fqn}.{p} holds packed 1-bit MoBiE weights (MoBiETensor): this model is already quantized; "
                    "binarizing binary weights again is not supported: quantize the full-precision checkpoint")


def check_not_requantizing(model: nn.Module, targets: list[tuple[str, nn.Module, tuple]], config) -> None:
    """Refuse packed weights and models whose config says they were binarized (records are not saved)."""
    check_not_packed(targets)
    if any(getattr(m, RECORDS, None) for m in model.modules()):
        return  # in memory: the per-parameter records are exact (checked by check_not_binarized)
    scope = set(getattr(config, "scope", ()))
    for e in quantization_marker(model):
        if scope & set(e.get("scope", ())):
            raise RuntimeError(
                f"{type(model).__name__} is already quantized: its config has {MARKER}={[e]} (written when it was "
                f"binarized by {e.get('config')}); binarizing binary weights again is not supported: quantize the "
                "full-precision checkpoint")


def check_finite_weights(targets: list[tuple[str, nn.Module, tuple]]) -> None:
    """Non-finite weights would silently turn into non-finite scales: name the parameter instead."""
    for fqn, module, params in targets:
        experts = is_experts_module(module)
        for p in params:
            w = getattr(module, p).detach()
            chunks = w.unbind(0) if experts else (w,)  # per expert: bounded temporary memory
            for i, c in enumerate(chunks):
                if not bool(torch.isfinite(c).all()):
                    n_bad = int((~torch.isfinite(w)).sum())
                    where = f" (first in expert {i})" if experts else ""
                    raise ValueError(
                        f"{fqn}.{p} has {n_bad} non-finite values (NaN/Inf){where}; refusing to binarize it (the "
                        "scales would become NaN): the checkpoint is corrupted or overflowed its dtype; reload or "
                        "repair the weights")


def targets_of(experts: list[ExpertsInfo], linears: list[LinearInfo]) -> list[tuple[str, nn.Module, tuple]]:
    return [(e.fqn, e.module, PROJECTIONS) for e in experts] + [(li.fqn, li.module, ("weight",)) for li in linears]


def config_diff(a, b) -> str:
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    from dataclasses import fields

    diffs = [f"{f.name}={getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(a)
             if f.compare and f.name != "step" and getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(diffs)


def check_same_config(module: nn.Module, params, config) -> None:
    """Observe and convert must use one config: the statistics were collected for the observed one."""
    observed = getattr(module, OBSERVED_WITH, {}) or {}
    for p in params:
        if p in observed:
            diff = config_diff(observed[p], config)
            if diff:
                raise ValueError(
                    f"{module_name(module)}.{p} was observed with {type(observed[p]).__name__} but step={config.step!r} got "
                    f"{type(config).__name__} ({diff}); use one config for both steps: "
                    "dataclasses.replace(config, step='observe') then config (step='convert')")


def finite_or_raise(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"binarizing {what} produced non-finite values; the weights were left unchanged")


def check_finite_hessian(h: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(h.reshape(h.shape[0], -1) if h.dim() == 3 else h.reshape(1, -1)).all(-1)
    if bool(bad.any()):
        which = f" of experts {bad.nonzero().flatten().tolist()}" if h.dim() == 3 else ""
        raise FloatingPointError(
            f"{name}: the calibration Hessian{which} has NaN/Inf entries: non-finite activations reached this "
            "layer; check the calibration data and the weights of the layers before it")


def check_no_router_align(config) -> None:
    """The torchao flows binarize module by module from full-precision statistics, so they cannot refit the
    routers on the quantized model's own activations (:mod:`~torchao_mobie.calibration.router_align`)."""
    if getattr(config, "router_align", False):
        raise ValueError(f"{type(config).__name__}(router_align=True) refits the routers on the quantized model's "
                         "own activations, which only the sequential pass has: use torchao_mobie.quantize_model, "
                         "or router_align=False with quantize_")
