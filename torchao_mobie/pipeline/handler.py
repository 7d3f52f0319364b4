"""The torchao side: the ``quantize_`` handler every config gets (:func:`binarize_module`: observe, or
binarize one module's parameters from what was observed, data-free otherwise), the filters that reach MoE
experts (torchao's default filter only visits ``nn.Linear``) and :func:`quantize_`, which checks every
target before torchao converts the first. No sequential propagation here: the statistics come from the
full-precision model."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..calibration import ExpertStatsCollector, LinearStatsCollector, log_fallback_summary
from ..integrations.transformers import (
    PROJECTIONS,
    ExpertsInfo,
    LinearInfo,
    MoEModelLayout,
    discover_moe_layout,
    experts_info,
    is_experts_module,
)
from ..marker import mark_quantized
from ..methods.base import ALL_SCOPES, BinarizationConfig, Scope
from ..storage.convert import pack_projection, packs
from ..storage.packed_model import finish_if_packed
from .binarize import apply_experts, apply_linear, routing_weighted, warn_data_free
from .guards import (
    check_finite_weights,
    check_no_router_align,
    check_not_binarized,
    check_not_packed,
    check_not_requantizing,
    check_packable,
    check_same_config,
)
from .report import KIND, NAME, OBSERVED_WITH, OBSERVER, ROUTER_STATS, module_name

__all__ = ["binarize_module", "moe_experts_filter", "quantize_", "scope_filter", "selected_targets", "tag_names"]


def binarize_module(module: nn.Module, config: BinarizationConfig, *, parameter_name: str | None = None) -> nn.Module:
    """Observe or binarize the parameters of one experts module or nn.Linear (torchao handler).

    parameter_name: ``gate_up_proj`` / ``down_proj`` (experts) or ``weight`` (nn.Linear); None = all.
    """
    if not isinstance(config, BinarizationConfig):
        raise TypeError(f"expected a BinarizationConfig, got {type(config).__name__}")
    name = module_name(module)
    if is_experts_module(module):
        info = experts_info(module, getattr(module, NAME, ""))
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
        if getattr(module, KIND, None) is None:
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
    check_not_binarized(module, params)
    check_not_packed([(name, module, params)])
    check_same_config(module, params, config)
    check_no_router_align(config)
    if config.step == "convert":
        check_finite_weights([(name, module, params)])
        check_packable([(name, module, params)], config)

    observer = getattr(module, OBSERVER, None)
    if config.step == "observe":
        if info is not None:
            if observer is None:
                observer = ExpertStatsCollector(info, params, min_expert_tokens=config.min_expert_tokens,
                                                routing_weighted=routing_weighted(config)).attach()
                setattr(module, OBSERVER, observer)
            else:
                for p in params:
                    observer.enable(p)
        elif observer is None:
            setattr(module, OBSERVER, LinearStatsCollector(module, name).attach())
        if getattr(module, OBSERVED_WITH, None) is None:
            setattr(module, OBSERVED_WITH, {})
        getattr(module, OBSERVED_WITH).update({p: config for p in params})
        return module

    if info is None:
        if isinstance(observer, LinearStatsCollector):
            hessian = observer.finalize()
            observer.detach()
            delattr(module, OBSERVER)
        else:
            warn_data_free(config, name)
            hessian = None
        apply_linear(module, hessian, config, name)
        forget_observed(module, params)
        return module

    for p in params:
        if isinstance(observer, ExpertStatsCollector) and p in observer.projections:
            hess = observer.finalize(p)
            log_fallback_summary(name, [hess.event])
            apply_experts(info, p, hess, config, f"{name}.{p}", router_stats=observer.router_stats())
            if not observer.projections:
                observer.detach()
                delattr(module, OBSERVER)
                setattr(module, ROUTER_STATS, observer.router_stats().to("cpu"))
        else:
            warn_data_free(config, f"{name}.{p}")
            apply_experts(info, p, None, config, f"{name}.{p}")
        forget_observed(module, (p,))
        if packs(config):  # no sequential propagation in this flow: pack as torchao configs do, right away
            pack_projection(module, p, name)
    return module


def forget_observed(module: nn.Module, params) -> None:
    observed = getattr(module, OBSERVED_WITH, None)
    if observed is None:
        return
    for p in params:
        observed.pop(p, None)
    if not observed:
        delattr(module, OBSERVED_WITH)


# --------------------------------------------------------------------------------------------------
# Filters and the quantize_ wrapper
# --------------------------------------------------------------------------------------------------


def moe_experts_filter(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for ``torchao.quantize_``: selects fused MoE experts modules (routed experts)."""
    return is_experts_module(module)


def tag_names(layout: MoEModelLayout) -> None:
    for layer in layout.layers:
        if layer.moe is not None:
            setattr(layer.moe.experts.module, NAME, layer.moe.experts.fqn)
        for li in layer.linears(set(ALL_SCOPES)):
            setattr(li.module, NAME, li.fqn)
            setattr(li.module, KIND, li.kind)


def selected_targets(layout: MoEModelLayout, scope) -> tuple[list[ExpertsInfo], list[LinearInfo]]:
    scope = set(scope)
    experts = layout.experts() if Scope.ROUTED_EXPERTS.value in scope else []
    linears = [li for layer in layout.layers for li in layer.linears(scope)]
    return experts, linears


def scope_filter(model: nn.Module, scope) -> Callable[[nn.Module, str], bool]:
    """``filter_fn`` selecting exactly the modules of ``model`` in ``scope`` (fqns relative to ``model``)."""
    layout = discover_moe_layout(model)
    tag_names(layout)
    experts, linears = selected_targets(layout, scope)
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
            tag_names(discover_moe_layout(model))
        except ValueError:
            pass
        ao_quantize_(model, config, filter_fn=None, device=device)
        finish_if_packed(model)
        return
    if not isinstance(config, BinarizationConfig):
        raise TypeError(f"torchao_mobie.quantize_ expects a BinarizationConfig or FqnToConfig, got {type(config).__name__}")
    check_no_router_align(config)
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
        check_not_binarized(m, params)
        check_same_config(m, params, config)
    check_not_requantizing(model, targets, config)
    if config.step == "convert":
        check_finite_weights(targets)
        check_packable(targets, config)
    ao_quantize_(model, config, filter_fn=filter_fn, device=device)
    if config.step == "convert" and targets:
        mark_quantized(model, config)
        finish_if_packed(model)


