"""Public API: sequential calibrated binarization and the torchao-native ``quantize_`` flow.

``quantize_model(model, config, calibration)`` (GPTQ order)
    1. one forward of the full-precision model captures the input of decoder layer 0 and the keyword
       arguments (masks, rotary embeddings, ...) the model passes every layer;
    2. for each decoder layer, stage by stage (true-sequential: attention inputs, attention output,
       MLP inputs = experts ``gate_up_proj`` + shared/dense gate/up, MLP outputs = experts ``down_proj``
       + shared/dense down): hooks collect the stage's statistics while the layer runs on its
       calibration inputs, then the stage is binarized, so each stage sees the outputs of the stages
       already binarized (down_proj's Hessian comes from the *binarized* gate_up);
    3. the binarized layer is re-run to produce the next layer's inputs.
    Only the current stage's statistics are alive at any time.

torchao-native (``torchao_mobie.quantize_`` or ``torchao.quantize_`` + :func:`moe_experts_filter` or
``FqnToConfig``): ``step="observe"`` installs statistics hooks on the experts modules (and on linear
layers in scope), the user runs calibration batches, ``step="convert"`` binarizes from the accumulated
statistics and removes the hooks. ``convert`` without observation is data-free (identity Hessian).
No sequential propagation in this flow: all statistics come from the full-precision model.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .algorithms.factors import CEJDFactors
from .algorithms.result import BitBudget
from .calibration import (
    ExpertHessians,
    ExpertStatsCollector,
    FallbackEvent,
    LinearStatsCollector,
    RouterInputStats,
    log_fallback_summary,
)
from .calibration.heldback import HeldbackLoss, hold_back
from .config import ALL_SCOPES, BinarizationConfig, BinarizedExperts, QuantContext, Scope
from .integrations.transformers import (
    PROJECTIONS,
    DecoderLayerInfo,
    ExpertsInfo,
    LinearInfo,
    MoEModelLayout,
    discover_moe_layout,
    experts_info,
    is_experts_module,
)

__all__ = [
    "BinarizationRecord",
    "QuantizationReport",
    "binarize_module",
    "moe_experts_filter",
    "quantize_",
    "quantize_model",
    "scope_filter",
]

logger = logging.getLogger("torchao_mobie")

_RECORDS = "_mobie_records"  # module attribute: {parameter name: BinarizationRecord}
_OBSERVER = "_mobie_observer"  # module attribute: the statistics collector installed by step="observe"
_ROUTER_STATS = "_mobie_router_stats"  # experts-module attribute left by a calibrated convert
_NAME = "_mobie_name"  # module attribute: fqn, for messages from torchao handlers
_KIND = "_mobie_kind"  # nn.Linear attribute: its Scope kind; untagged linears (lm_head, gates) are refused
_OBSERVED_WITH = "_mobie_observed_with"  # module attribute: {parameter name: config of step="observe"}
#: ``model.config`` key listing the quantization runs applied to a model. Records live on modules and are
#: lost by ``save_pretrained``; this entry is written to config.json, so a reloaded fake-quant checkpoint
#: is still recognized as binarized.
MARKER = "torchao_mobie"


# --------------------------------------------------------------------------------------------------
# Records and report
# --------------------------------------------------------------------------------------------------


@dataclass
class BinarizationRecord:
    """Left on a module for each binarized parameter (also what forbids binarizing it twice)."""

    config: str
    bits: BitBudget
    data_free: bool = False
    fallback_experts: list[int] = field(default_factory=list)


@dataclass
class QuantizationReport:
    """What a quantization run did.

    parameters: per binarized parameter fqn, its :class:`BitBudget`; ``bits`` sums them
        (``report.bits.paper_bits``, ``report.bits.all_inclusive_bits``).
    fallback_events: experts that used the layer-level Hessian (too few calibration tokens).
    router_stats: router-input moments per MoE block fqn (CPU tensors).
    data_free: parameters binarized without calibration statistics.
    """

    config: str = ""
    parameters: dict[str, BitBudget] = field(default_factory=dict)
    wall_time_s: float = 0.0
    fallback_events: list[FallbackEvent] = field(default_factory=list)
    router_stats: dict[str, RouterInputStats] = field(default_factory=dict)
    data_free: list[str] = field(default_factory=list)
    calibration_tokens: int = 0

    @property
    def bits(self) -> BitBudget:
        total = BitBudget()
        for b in self.parameters.values():
            total = total + b
        return total

    def summary(self) -> str:
        b = self.bits
        n_fb = sum(len(e.experts) for e in self.fallback_events)
        return (f"{self.config}: {len(self.parameters)} parameters, {b.n_weights} weights, "
                f"{b.paper_bits:.4f} bits/weight (paper convention), {b.all_inclusive_bits:.4f} (all-inclusive), "
                f"{self.calibration_tokens} calibration tokens, {n_fb} expert fallbacks, "
                f"{len(self.data_free)} data-free, {self.wall_time_s:.1f} s")

    @classmethod
    def from_model(cls, model: nn.Module) -> "QuantizationReport":
        """Rebuild a report from the records left on a model's modules (e.g. after ``quantize_``)."""
        report = cls()
        configs = set()
        for fqn, module in model.named_modules():
            for pname, rec in getattr(module, _RECORDS, {}).items():
                name = f"{fqn}.{pname}" if fqn else pname
                report.parameters[name] = rec.bits
                configs.add(rec.config)
                if rec.data_free:
                    report.data_free.append(name)
            stats = getattr(module, _ROUTER_STATS, None)
            if stats is not None:
                report.router_stats[fqn.rsplit(".", 1)[0] if "." in fqn else fqn] = stats
        report.config = ",".join(sorted(configs))
        return report


def _records(module: nn.Module) -> dict:
    recs = getattr(module, _RECORDS, None)
    if recs is None:
        recs = {}
        setattr(module, _RECORDS, recs)
    return recs


def _name(module: nn.Module) -> str:
    return getattr(module, _NAME, "") or type(module).__name__


def _check_not_binarized(module: nn.Module, params) -> None:
    recs = getattr(module, _RECORDS, {})
    for p in params:
        if p in recs:
            raise RuntimeError(
                f"{_name(module)}.{p} is already binarized (by {recs[p].config}); binarizing binary weights again "
                "is not supported: reload the full-precision weights to quantize with another config")


def quantization_marker(model: nn.Module) -> list[dict]:
    """The quantization runs recorded in ``model.config`` (``[]`` for a model never quantized)."""
    entries = getattr(getattr(model, "config", None), MARKER, None)
    return [dict(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _mark_quantized(model: nn.Module, config: BinarizationConfig, storage: str = "fake-quant") -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    entries = quantization_marker(model)
    entries.append({"config": type(config).__name__, "scope": list(config.scope), "storage": storage})
    setattr(cfg, MARKER, entries)


def _check_not_packed(targets: list[tuple[str, nn.Module, tuple]]) -> None:
    from .storage.mobie_tensor import MoBiETensor

    for fqn, module, params in targets:
        for p in params:
            if isinstance(getattr(module, p, None), MoBiETensor):
                raise RuntimeError(
                    f"{fqn}.{p} holds packed 1-bit MoBiE weights (MoBiETensor): this model is already quantized; "
                    "binarizing binary weights again is not supported: quantize the full-precision checkpoint")


def _check_not_requantizing(model: nn.Module, targets: list[tuple[str, nn.Module, tuple]], config) -> None:
    """Refuse packed weights and models whose config says they were binarized (records are not saved)."""
    _check_not_packed(targets)
    if any(getattr(m, _RECORDS, None) for m in model.modules()):
        return  # in memory: the per-parameter records are exact (checked by _check_not_binarized)
    scope = set(getattr(config, "scope", ()))
    for e in quantization_marker(model):
        if scope & set(e.get("scope", ())):
            raise RuntimeError(
                f"{type(model).__name__} is already quantized: its config has {MARKER}={[e]} (written when it was "
                f"binarized by {e.get('config')}); binarizing binary weights again is not supported: quantize the "
                "full-precision checkpoint")


def _packs(config) -> bool:
    from .storage.convert import packs

    return packs(config)


def _check_packable(targets: list[tuple[str, nn.Module, tuple]], config) -> None:
    from .storage.convert import check_targets_packable

    check_targets_packable(targets, config)


def _check_finite_weights(targets: list[tuple[str, nn.Module, tuple]]) -> None:
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


def _targets(experts: list[ExpertsInfo], linears: list[LinearInfo]) -> list[tuple[str, nn.Module, tuple]]:
    return [(e.fqn, e.module, PROJECTIONS) for e in experts] + [(li.fqn, li.module, ("weight",)) for li in linears]


def _config_diff(a, b) -> str:
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    from dataclasses import fields

    diffs = [f"{f.name}={getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(a)
             if f.compare and f.name != "step" and getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(diffs)


def _check_same_config(module: nn.Module, params, config) -> None:
    """Observe and convert must use one config: the statistics were collected for the observed one."""
    observed = getattr(module, _OBSERVED_WITH, {}) or {}
    for p in params:
        if p in observed:
            diff = _config_diff(observed[p], config)
            if diff:
                raise ValueError(
                    f"{_name(module)}.{p} was observed with {type(observed[p]).__name__} but step={config.step!r} got "
                    f"{type(config).__name__} ({diff}); use one config for both steps: "
                    "dataclasses.replace(config, step='observe') then config (step='convert')")


# --------------------------------------------------------------------------------------------------
# Binarizing one parameter (shared by both flows)
# --------------------------------------------------------------------------------------------------

_DATA_FREE_WARNED: dict[int, weakref.ref] = {}


def _warn_data_free(config: BinarizationConfig, what: str) -> None:
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


def _finite_or_raise(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"binarizing {what} produced non-finite values; the weights were left unchanged")


def _not_positive_definite(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.linalg.LinAlgError) or "positive definite" in msg or "singular" in msg


def _check_finite_hessian(h: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(h.reshape(h.shape[0], -1) if h.dim() == 3 else h.reshape(1, -1)).all(-1)
    if bool(bad.any()):
        which = f" of experts {bad.nonzero().flatten().tolist()}" if h.dim() == 3 else ""
        raise FloatingPointError(
            f"{name}: the calibration Hessian{which} has NaN/Inf entries: non-finite activations reached this "
            "layer; check the calibration data and the weights of the layers before it")


def _quantize_with_ridge_fallback(run, h: torch.Tensor, name: str, config: BinarizationConfig):
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


def _apply_experts(info: ExpertsInfo, projection: str, hess: ExpertHessians | None, config: BinarizationConfig,
                   name: str, router_stats: RouterInputStats | None = None, guided_hessian: torch.Tensor | None = None,
                   downstream_routers: list | None = None, judge=None, plan_memory=None) -> BinarizationRecord:
    w = info.weight(projection).detach().float()
    e, _, d = w.shape
    if hess is None:
        h3d = torch.eye(d, device=w.device).repeat(e, 1, 1)
        ctx = QuantContext(name=name, projection=projection, data_free=True, router_stats=router_stats)
    else:
        h3d = hess.hessian
        ctx = QuantContext(name=name, projection=projection, token_counts=hess.counts,
                           fallback_experts=hess.fallback_experts, router_stats=router_stats,
                           guided_hessian=guided_hessian, downstream_routers=list(downstream_routers or []),
                           calibration_split=hess.split, judge=judge, sibling_bits=_sibling_bits(info, projection),
                           plan_memory=plan_memory)
    if hess is None:
        res = config.quantize_experts(w, h3d, context=ctx)
    else:
        _check_finite_hessian(h3d, name)
        res = _quantize_with_ridge_fallback(lambda h: config.quantize_experts(w, h, context=ctx), h3d, name, config)
    if not isinstance(res, BinarizedExperts):
        res = BinarizedExperts(*res)
    if tuple(res.weight.shape) != tuple(w.shape):
        raise ValueError(f"{type(config).__name__}.quantize_experts returned {list(res.weight.shape)} for {name}, "
                         f"expected {list(w.shape)}")
    _finite_or_raise(res.weight, name)
    info.set_weight(projection, res.weight)
    if isinstance(res.factors, CEJDFactors):  # the stored form (MoBiE), kept for packing (torchao_mobie.storage)
        store = getattr(info.module, "_mobie_factors", None)
        if store is None:
            store = {}
            setattr(info.module, "_mobie_factors", store)
        store[projection] = res.factors
    rec = BinarizationRecord(config=type(config).__name__, bits=res.bits, data_free=hess is None,
                             fallback_experts=[] if hess is None else hess.fallback_experts)
    _records(info.module)[projection] = rec
    return rec


def _sibling_bits(info: ExpertsInfo, projection: str) -> float | None:
    rec = _records(info.module).get("gate_up_proj") if projection == "down_proj" else None
    return None if rec is None else rec.bits.all_inclusive_bits


def _apply_linear(module: nn.Linear, hessian: torch.Tensor | None, config: BinarizationConfig,
                  name: str) -> BinarizationRecord:
    w = module.weight.detach().float()
    data_free = hessian is None
    if data_free:
        hessian = torch.eye(module.in_features, device=w.device)
    ctx = QuantContext(name=name, projection="weight", data_free=data_free)
    if data_free:
        res = config.quantize_linear(w, hessian, context=ctx)
    else:
        _check_finite_hessian(hessian, name)
        res = _quantize_with_ridge_fallback(lambda h: config.quantize_linear(w, h, context=ctx), hessian, name, config)
    if tuple(res.weight.shape) != tuple(w.shape):
        raise ValueError(f"{type(config).__name__}.quantize_linear returned {list(res.weight.shape)} for {name}, "
                         f"expected {list(w.shape)}")
    _finite_or_raise(res.weight, name)
    with torch.no_grad():
        module.weight.data.copy_(res.weight.to(module.weight.dtype))
    rec = BinarizationRecord(config=type(config).__name__, bits=res.bits, data_free=data_free)
    _records(module)["weight"] = rec
    return rec


# --------------------------------------------------------------------------------------------------
# torchao handler body (registered for every BinarizationConfig subclass in config.py)
# --------------------------------------------------------------------------------------------------


def binarize_module(module: nn.Module, config: BinarizationConfig, *, parameter_name: str | None = None) -> nn.Module:
    """Observe or binarize the parameters of one experts module or nn.Linear (torchao handler).

    parameter_name: ``gate_up_proj`` / ``down_proj`` (experts) or ``weight`` (nn.Linear); None = all.
    """
    if not isinstance(config, BinarizationConfig):
        raise TypeError(f"expected a BinarizationConfig, got {type(config).__name__}")
    name = _name(module)
    if is_experts_module(module):
        info = experts_info(module, getattr(module, _NAME, ""))
        if parameter_name is None:
            params = PROJECTIONS
        elif parameter_name in PROJECTIONS:
            params = (parameter_name,)
        else:
            raise ValueError(f"{name}.{parameter_name} cannot be binarized by {type(config).__name__}: only the expert "
                             f"weights {PROJECTIONS} are (biases stay in full precision)")
    elif isinstance(module, nn.Linear):
        if parameter_name not in (None, "weight"):
            raise ValueError(f"{name}.{parameter_name} cannot be binarized: only the weight of an nn.Linear is")
        if getattr(module, _KIND, None) is None:
            raise ValueError(
                f"{type(config).__name__} got an nn.Linear ({name}) that is not a known attention / shared-expert / "
                "dense-MLP projection of an MoE model: routers, gates, embeddings and lm_head are never binarized. "
                "torchao's default filter visits every nn.Linear; use torchao_mobie.quantize_(model, config) (scope-aware, "
                "also with FqnToConfig) or torchao.quantize_(model, config, filter_fn=torchao_mobie.moe_experts_filter)")
        info, params = None, ("weight",)
    else:
        raise TypeError(
            f"{type(config).__name__} binarizes MoE experts modules (3D gate_up_proj/down_proj) and nn.Linear layers, "
            f"got {name} ({type(module).__name__}); select modules with torchao_mobie.moe_experts_filter, "
            "torchao_mobie.quantize_ or FqnToConfig")
    _check_not_binarized(module, params)
    _check_not_packed([(name, module, params)])
    _check_same_config(module, params, config)
    if config.step == "convert":
        _check_finite_weights([(name, module, params)])
        _check_packable([(name, module, params)], config)

    observer = getattr(module, _OBSERVER, None)
    if config.step == "observe":
        if info is not None:
            if observer is None:
                observer = ExpertStatsCollector(info, params, min_expert_tokens=config.min_expert_tokens,
                                                routing_weighted=_routing_weighted(config)).attach()
                setattr(module, _OBSERVER, observer)
            else:
                for p in params:
                    observer.enable(p)
        elif observer is None:
            setattr(module, _OBSERVER, LinearStatsCollector(module, name).attach())
        if getattr(module, _OBSERVED_WITH, None) is None:
            setattr(module, _OBSERVED_WITH, {})
        getattr(module, _OBSERVED_WITH).update({p: config for p in params})
        return module

    if info is None:
        if isinstance(observer, LinearStatsCollector):
            hessian = observer.finalize()
            observer.detach()
            delattr(module, _OBSERVER)
        else:
            _warn_data_free(config, name)
            hessian = None
        _apply_linear(module, hessian, config, name)
        _forget_observed(module, params)
        return module

    for p in params:
        if isinstance(observer, ExpertStatsCollector) and p in observer.projections:
            hess = observer.finalize(p)
            log_fallback_summary(name, [hess.event])
            _apply_experts(info, p, hess, config, f"{name}.{p}", router_stats=observer.router_stats())
            if not observer.projections:
                observer.detach()
                delattr(module, _OBSERVER)
                setattr(module, _ROUTER_STATS, observer.router_stats().to("cpu"))
        else:
            _warn_data_free(config, f"{name}.{p}")
            _apply_experts(info, p, None, config, f"{name}.{p}")
        _forget_observed(module, (p,))
        if _packs(config):  # no sequential propagation in this flow: pack as torchao configs do, right away
            from .storage.convert import pack_projection

            pack_projection(module, p, name)
    return module


def _forget_observed(module: nn.Module, params) -> None:
    observed = getattr(module, _OBSERVED_WITH, None)
    if observed is None:
        return
    for p in params:
        observed.pop(p, None)
    if not observed:
        delattr(module, _OBSERVED_WITH)


# --------------------------------------------------------------------------------------------------
# Filters and the quantize_ wrapper
# --------------------------------------------------------------------------------------------------


def moe_experts_filter(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for ``torchao.quantize_``: selects fused MoE experts modules (routed experts)."""
    return is_experts_module(module)


def _tag_names(layout: MoEModelLayout) -> None:
    for layer in layout.layers:
        if layer.moe is not None:
            setattr(layer.moe.experts.module, _NAME, layer.moe.experts.fqn)
        for li in layer.linears(set(ALL_SCOPES)):
            setattr(li.module, _NAME, li.fqn)
            setattr(li.module, _KIND, li.kind)


def _selected(layout: MoEModelLayout, scope) -> tuple[list[ExpertsInfo], list[LinearInfo]]:
    scope = set(scope)
    experts = layout.experts() if Scope.ROUTED_EXPERTS.value in scope else []
    linears = [li for layer in layout.layers for li in layer.linears(scope)]
    return experts, linears


def scope_filter(model: nn.Module, scope) -> Callable[[nn.Module, str], bool]:
    """``filter_fn`` selecting exactly the modules of ``model`` in ``scope`` (fqns relative to ``model``)."""
    layout = discover_moe_layout(model)
    _tag_names(layout)
    experts, linears = _selected(layout, scope)
    selected = {e.fqn for e in experts} | {li.fqn for li in linears}
    return lambda module, fqn: fqn in selected


_DEFAULT = object()


def quantize_(model: nn.Module, config, filter_fn=_DEFAULT, device=None) -> None:
    """``torchao.quantize_`` with a filter that reaches MoE experts.

    torchao's default filter only visits ``nn.Linear``; here the default is the config's scope
    (routed experts modules by default, plus attention / shared experts / dense MLP linears when the
    scope asks for them). ``FqnToConfig`` configs are passed through (``filter_fn`` must be left unset).
    """
    from torchao.quantization import FqnToConfig
    from torchao.quantization import quantize_ as ao_quantize_

    if isinstance(config, FqnToConfig):
        if filter_fn not in (_DEFAULT, None):
            raise ValueError("filter_fn must be left unset with FqnToConfig (torchao requires filter_fn=None)")
        try:
            _tag_names(discover_moe_layout(model))
        except ValueError:
            pass
        ao_quantize_(model, config, filter_fn=None, device=device)
        _finish_packed(model)
        return
    if not isinstance(config, BinarizationConfig):
        raise TypeError(f"torchao_mobie.quantize_ expects a BinarizationConfig or FqnToConfig, got {type(config).__name__}")
    if filter_fn is _DEFAULT or filter_fn is None:
        filter_fn = scope_filter(model, config.scope)
    # every check before the first module is touched (torchao converts module by module)
    targets = []
    for fqn, m in model.named_modules():
        if filter_fn(m, fqn):
            if is_experts_module(m):
                targets.append((fqn, m, PROJECTIONS))
            elif isinstance(m, nn.Linear):
                targets.append((fqn, m, ("weight",)))
    for _, m, params in targets:
        _check_not_binarized(m, params)
        _check_same_config(m, params, config)
    _check_not_requantizing(model, targets, config)
    if config.step == "convert":
        _check_finite_weights(targets)
        _check_packable(targets, config)
    ao_quantize_(model, config, filter_fn=filter_fn, device=device)
    if config.step == "convert" and targets:
        _mark_quantized(model, config)
        _finish_packed(model)


def _finish_packed(model: nn.Module) -> None:
    from .storage.convert import finish_if_packed

    finish_if_packed(model)


# --------------------------------------------------------------------------------------------------
# Sequential pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    heldback: bool = False  # rows held back for choices judged out of sample (calibration.heldback)

    @property
    def token_mask(self) -> torch.Tensor | None:
        return None if self.attention_mask is None else self.attention_mask.reshape(-1).bool()

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())


def _as_batch(item, device) -> _Batch:
    mask = None
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration dicts need an 'input_ids' entry, got keys {sorted(item)}")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids = item
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be integers, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration batches must be non-empty [batch, seqlen] token ids, got shape {list(ids.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(ids.shape).to(device)
    return _Batch(ids.long().to(device), mask)


def _calibration_batches(calibration, batch_size: int, device) -> list[_Batch]:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            hint = (" (a token stream? cut it into samples with torchao_mobie.data.calibration_samples(ids, n_samples, "
                    "seqlen), or pass ids[None] for one sequence)" if calibration.dim() == 1 else "")
            raise ValueError(f"calibration must be a LongTensor [n_samples, seqlen] (2-D), got a {calibration.dim()}-D "
                             f"tensor of shape {list(calibration.shape)}{hint}")
        if calibration.shape[0] == 0 or calibration.shape[1] == 0:
            raise ValueError(f"calibration is empty: a tensor of shape {list(calibration.shape)}; expected "
                             "[n_samples, seqlen] with n_samples, seqlen >= 1")
        items = list(calibration.split(batch_size))
    elif isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
    else:
        raise TypeError(f"calibration must be a LongTensor [n, seqlen], or an iterable of such batches or of dicts "
                        f"with 'input_ids', got {type(calibration).__name__}")
    batches = [_as_batch(item, device) for item in items]
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def _check_calibration(model: nn.Module, batches: list[_Batch]) -> None:
    """Token ids the embedding cannot look up, or sequences longer than the model's positions, would
    fail deep inside the forward (or silently extrapolate rotary positions): refuse them up front."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    cfg = getattr(model, "config", None)
    vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    for i, b in enumerate(batches):
        ids = b.input_ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(
                f"calibration batch {i}: token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                f"[0, {vocab}); were the samples tokenized with this model's tokenizer?")
        if isinstance(max_pos, int) and ids.shape[1] > max_pos:
            raise ValueError(
                f"calibration batch {i}: sequences of {ids.shape[1]} tokens are longer than the model's context "
                f"(config.max_position_embeddings={max_pos}); use seqlen <= {max_pos}")


def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return base if isinstance(base, nn.Module) else model


@torch.no_grad()
def _capture_layer_inputs(model: nn.Module, layout: MoEModelLayout, batches: list[_Batch], forward=None):
    """Layer-0 hidden states per batch, and for every layer the (args, kwargs) the model passes it.

    ``forward()`` runs the model over ``batches`` (default: the base model, no LM head); GLAS passes its
    gradient pass here so that one forward serves both."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layout.layers]

    def check(hs, where):
        if isinstance(hs, torch.Tensor) and not bool(torch.isfinite(hs).all()):
            raise FloatingPointError(
                f"non-finite calibration activations (NaN/Inf) {where} on calibration batch {len(calls[0]) - 1}, "
                "in the full-precision model (no weight was changed): check that layer's weights and the "
                "calibration token ids")

    def make_hook(i):
        def hook(module, args, kwargs):
            if args:
                hs, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hs, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                hidden.append(hs.detach())
            calls[i].append((rest, dict(kwargs)))
            check(hs, f"entering {layout.layers[i].fqn}" + (" (the embedding output)" if i == 0 else
                                                              f" (the output of {layout.layers[i - 1].fqn})"))
        return hook

    def last_hook(module, args, output):
        check(_layer_output(output), f"at the output of {layout.layers[-1].fqn}")

    handles = [layer.module.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layout.layers)]
    handles.append(layout.layers[-1].module.register_forward_hook(last_hook))
    try:
        if forward is None:
            _forward_batches(model, batches)
        else:
            forward()
    finally:
        for h in handles:
            h.remove()
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError(f"{layout.model_class}: the decoder layers in {layout.layers_fqn} were not each called "
                           "once per calibration batch; cannot run the sequential pipeline on this model")
    return hidden, calls


def _forward_batches(model: nn.Module, batches: list[_Batch]) -> None:
    base = _base_model(model)
    for b in batches:
        base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)


def _glas_batches(config, batches: list[_Batch]) -> int:
    """How many leading calibration batches get the GLAS backward pass (``glas_samples`` rows or more)."""
    want = getattr(config, "glas_samples", None)
    if want is None:
        return len(batches)
    rows = 0
    for i, b in enumerate(batches):
        rows += b.input_ids.shape[0]
        if rows >= want:
            return i + 1
    return len(batches)


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class _Stage:
    projections: tuple[str, ...]  # of the layer's experts module
    linears: list[LinearInfo]


def _stages(layer: DecoderLayerInfo, scope: set, true_sequential: bool) -> list[_Stage]:
    experts_on = layer.moe is not None and Scope.ROUTED_EXPERTS.value in scope
    linears = layer.linears(scope)
    if not true_sequential:
        stages = [_Stage(PROJECTIONS if experts_on else (), linears)]
    else:
        attn = [li for li in linears if li.kind == Scope.ATTENTION.value]
        mlp = [li for li in linears if li.kind != Scope.ATTENTION.value]
        stages = [
            _Stage((), [li for li in attn if li.stage == "in"]),
            _Stage((), [li for li in attn if li.stage == "out"]),
            _Stage(("gate_up_proj",) if experts_on else (), [li for li in mlp if li.stage == "in"]),
            _Stage(("down_proj",) if experts_on else (), [li for li in mlp if li.stage == "out"]),
        ]
    return [s for s in stages if s.projections or s.linears]


def _downstream_routers(layout: MoEModelLayout, index: int) -> list:
    """``(W_router·diag(γ) [E, H], None)`` of the MoE layers after ``index`` (γ: the RMSNorm the router
    input goes through), nearest first; for expert-shift-aware methods (NGES)."""
    out = []
    for layer in layout.layers[index + 1:]:
        if layer.moe is None or getattr(layer.moe.router, "weight", None) is None:
            continue
        wr = layer.moe.router.weight.detach().float()
        norm = getattr(layer.module, "post_attention_layernorm", None)
        gamma = getattr(norm, "weight", None)
        if isinstance(gamma, torch.Tensor) and gamma.shape == (wr.shape[1],):
            wr = wr * gamma.detach().float()[None, :]
        out.append((wr.cpu(), None))
    return out


def _heldback_loss(model: nn.Module, layout: MoEModelLayout, calls, batches: list[_Batch]) -> HeldbackLoss | None:
    """The held-back loss judge, when there are held-back batches and the model has its LM head."""
    norm = getattr(_base_model(model), "norm", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not any(b.heldback for b in batches) or norm is None or lm_head is None:
        return None
    return HeldbackLoss([layer.module for layer in layout.layers], calls, batches,
                        lambda h: lm_head(norm(h)), _layer_output)


def _routing_weighted(config) -> bool:
    return bool(getattr(config, "route_weighted", False))


def _run_stage(layer: DecoderLayerInfo, stage: _Stage, hidden, calls, batches, config: BinarizationConfig,
               report: QuantizationReport, events: list[FallbackEvent], glas=None, downstream=None,
               heldloss=None, plan_memory=None) -> None:
    experts = None
    guided = {}
    if stage.projections:
        experts = ExpertStatsCollector(layer.moe.experts, stage.projections,
                                       min_expert_tokens=config.min_expert_tokens,
                                       routing_weighted=_routing_weighted(config),
                                       heldback=bool(getattr(config, "needs_heldback", False))).attach()
        if glas is not None:
            from .calibration.gradients import GLASCollector

            guided = {p: GLASCollector(layer.moe.experts, (p,), min_expert_tokens=config.min_expert_tokens).attach()
                      for p in stage.projections}
    linears = [LinearStatsCollector(li.module, li.fqn).attach() for li in stage.linears]
    collectors = ([experts] if experts else []) + linears + list(guided.values())
    try:
        for bi, (h, (args, kwargs), b) in enumerate(zip(hidden, calls, batches)):
            for c in collectors:
                c.token_mask = b.token_mask
            if experts is not None:
                experts.heldback_mask = torch.full((b.input_ids.numel(),), b.heldback, device=b.input_ids.device)
            for p, c in guided.items():  # None past the batches with gradients: the collector skips them
                c.fp_routing = glas.batch(layer.moe.experts.fqn, p, bi) if bi < glas.n_batches else None
            layer.module(h, *args, **kwargs)
    finally:
        for c in collectors:
            c.detach()

    for li, c in zip(stage.linears, linears):
        report.parameters[f"{li.fqn}.weight"] = _apply_linear(li.module, c.finalize(), config, li.fqn).bits
    del linears
    if experts is not None:
        info = layer.moe.experts
        stats = experts.router_stats()
        if "gate_up_proj" in stage.projections:
            report.router_stats[layer.moe.fqn] = stats.to("cpu")
        for p in stage.projections:
            hess = experts.finalize(p)
            name = f"{info.fqn}.{p}"
            gh = guided[p].guided_hessian(p) if p in guided else None
            report.parameters[name] = _apply_experts(info, p, hess, config, name, router_stats=stats, guided_hessian=gh,
                                                     downstream_routers=downstream if p == "down_proj" else None,
                                                     judge=None if heldloss is None else
                                                     heldloss.judge(layer.index, hidden, info, p),
                                                     plan_memory=plan_memory).bits
            events.append(hess.event)
            if hess.event.experts:
                report.fallback_events.append(hess.event)
            del hess


@torch.no_grad()
def quantize_model(model: nn.Module, config: BinarizationConfig, calibration, *, progress: bool = True,
                   true_sequential: bool = True, batch_size: int = 8) -> QuantizationReport:
    """Binarize ``model`` in place, layer by layer, with calibration statistics (GPTQ order).

    Args:
        model: a transformers MoE model (``*ForCausalLM`` or its base model) with fused experts.
        config: a :class:`~torchao_mobie.config.BinarizationConfig` with ``step="convert"``.
        calibration: LongTensor ``[n, seqlen]`` of token ids (split into ``batch_size`` rows per batch),
            or an iterable of such batches or of dicts with ``input_ids`` (and optional
            ``attention_mask``: padded tokens are left out of every statistic).
        progress: tqdm bar over decoder layers.
        true_sequential: re-collect statistics after each stage of a layer (attention inputs,
            attention output, MLP inputs, MLP outputs); False collects one layer's statistics in one
            pass from the layer's (already sequential) inputs, as the observe/convert flow does.
        batch_size: rows per batch when ``calibration`` is one tensor.

    Returns a :class:`QuantizationReport`.

    Everything that can be checked before a weight changes is checked first (layout, earlier
    binarization, finite weights, calibration dtype / shape / token ids / length, finite activations of
    the full-precision forward), so bad input leaves the model as it was. A failure after that (a
    Hessian that no damping fixes) leaves the layers before it binarized; the exception's note says so.
    """
    t0 = time.perf_counter()
    if not isinstance(config, BinarizationConfig):
        raise TypeError(f"quantize_model expects a BinarizationConfig, got {type(config).__name__}")
    if config.step != "convert":
        raise ValueError(f"quantize_model runs the calibration itself; pass {type(config).__name__}(step='convert') "
                         f"(got step={config.step!r})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layout = discover_moe_layout(model)
    _tag_names(layout)
    scope = set(config.scope)
    experts, linears = _selected(layout, scope)
    targets = _targets(experts, linears)
    for _, m, params in targets:
        _check_not_binarized(m, params)
    _check_not_requantizing(model, targets, config)
    for m in [e.module for e in experts] + [li.module for li in linears]:
        if getattr(m, _OBSERVER, None) is not None:
            raise RuntimeError(f"{_name(m)} has observers from step='observe'; finish that flow with step='convert' "
                               "instead of calling quantize_model")
    _check_finite_weights(targets)
    _check_packable(targets, config)

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    batches = _calibration_batches(calibration, batch_size, device)
    _check_calibration(model, batches)
    if getattr(config, "needs_heldback", False) and experts:
        batches = hold_back(batches, _Batch)
    report = QuantizationReport(config=type(config).__name__, calibration_tokens=sum(b.n_tokens for b in batches))

    was_training = model.training
    model.eval()
    layer = None
    try:
        # first: the full-precision forward also checks every layer's activations are finite, so bad
        # calibration data or weights fail here, before any weight is changed
        glas, forward = None, None
        if getattr(config, "needs_gradients", False) and experts:
            from .calibration.gradients import compute_glas_weights

            def forward():  # the GLAS pass is the capture forward of its batches
                nonlocal glas
                n = _glas_batches(config, batches)
                glas = compute_glas_weights(model, experts, batches[:n], power=config.glas_power)
                _forward_batches(model, batches[n:])
        hidden, calls = _capture_layer_inputs(model, layout, batches, forward)
        heldloss = _heldback_loss(model, layout, calls, batches)
        plan_memory: dict = {}
        from tqdm.auto import tqdm

        for layer in tqdm(layout.layers, desc=f"{type(config).__name__}: layers", disable=not progress):
            events: list[FallbackEvent] = []
            for stage in _stages(layer, scope, true_sequential):
                _run_stage(layer, stage, hidden, calls[layer.index], batches, config, report, events, glas=glas,
                           downstream=_downstream_routers(layout, layer.index), heldloss=heldloss,
                           plan_memory=plan_memory)
            log_fallback_summary(layer.fqn, events)
            hidden = [_layer_output(layer.module(h, *args, **kwargs))
                      for h, (args, kwargs) in zip(hidden, calls[layer.index])]
    except Exception as e:
        if report.parameters and hasattr(e, "add_note"):
            e.add_note(f"quantize_model stopped in {layer.fqn if layer is not None else '?'} after binarizing "
                       f"{len(report.parameters)} parameters in place (last: {list(report.parameters)[-1]}): the "
                       "model is partially quantized; reload the full-precision weights before retrying")
        raise
    finally:
        model.train(was_training)
    _mark_quantized(model, config)
    if _packs(config) and experts:  # last: every layer ran on the fake-quant weights, as with packed=False
        from .storage.convert import pack_model

        pack_model(model)
    report.wall_time_s = time.perf_counter() - t0
    logger.info("%s", report.summary())
    return report
