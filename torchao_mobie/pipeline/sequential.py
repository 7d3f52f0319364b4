"""The sequential pipeline, :func:`quantize_model` (GPTQ order).

1. one forward of the full-precision model captures the input of decoder layer 0 and the keyword
   arguments (masks, rotary embeddings, ...) the model passes every layer; GLAS (when the config asks for
   it) then runs layer by layer on the full-precision model (:mod:`~torchao_mobie.calibration.glas_layerwise`),
   through the graphs that forward kept when they fit the activation budget (:mod:`~torchao_mobie.calibration.glas_graphs`);
2. for each decoder layer, stage by stage (true-sequential: attention inputs, attention output, MLP
   inputs = experts ``gate_up_proj`` + shared/dense gate/up, MLP outputs = experts ``down_proj`` +
   shared/dense down): hooks collect the stage's statistics while the layer runs on its calibration
   inputs, then the stage is binarized, so each stage sees the outputs of the stages already binarized
   (down_proj's Hessian comes from the *binarized* gate_up);
3. the binarized layer is re-run to produce the next layer's inputs.
Only the current stage's statistics are alive at any time.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import ExpertStatsCollector, FallbackEvent, LinearStatsCollector, log_fallback_summary
from ..calibration.activations import ActivationStore, activation_budget
from ..calibration.fp_shadow import FPShadow
from ..calibration.glas_graphs import KeptGraphs
from ..calibration.glas_layerwise import ModelLayers, forward_boundaries, glas_from_graphs, layerwise_glas_weights, \
    lm_loss_sum
from ..calibration.gradients import GLASCollector
from ..calibration.heldback import HeldbackLoss, hold_back
from ..calibration.router_align import RouterTargets, align_router
from ..integrations.transformers import PROJECTIONS, DecoderLayerInfo, LinearInfo, MoEModelLayout, discover_moe_layout
from ..marker import mark_quantized
from ..methods.base import BinarizationConfig, Scope
from ..storage.convert import packs
from ..storage.packed_model import pack_model
from .batches import CalibrationBatch, calibration_batches, check_calibration
from .binarize import apply_experts, apply_linear, fp_target_refit, routing_weighted
from .guards import check_finite_weights, check_not_binarized, check_not_requantizing, check_packable, targets_of
from .handler import selected_targets, tag_names
from .replay import LayerReplay, StopLayer, attention_replayed, recording
from .report import OBSERVER, QuantizationReport, module_name

__all__ = ["quantize_model"]

logger = logging.getLogger("torchao_mobie")



def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):  # e.g. Llama4ForCausalLM: prefix "language_model", the decoder at .model
        base = getattr(model, "model", None)
    return base if isinstance(base, nn.Module) else model


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layout: MoEModelLayout, batches: list[CalibrationBatch],
                         record: int = 0, budget: int | None = None, graphs: KeptGraphs | None = None):
    """Layer-0 hidden states per batch, and for every layer the (args, kwargs) the model passes it (one
    forward of the base model, no LM head).

    ``record``: also keep every layer's input and the last layer's output of the leading ``record`` batches,
    the boundaries layer-wise GLAS stores (:func:`~..calibration.glas_layerwise.forward_boundaries`
    recomputes the same values from the same inputs, so this saves a forward of the whole model) while they
    fit ``budget`` bytes (the activation store's rule); returned as ``[level][batch]``, or None past it.
    ``graphs``: also keep each layer's autograd graph for layer-wise GLAS (:class:`KeptGraphs`).
    Returns ``(hidden, calls)``, or ``(hidden, calls, boundaries)`` when ``record``."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layout.layers]
    levels = [[] for _ in range(len(layout.layers) + 1)] if record else None
    kept = [0]
    budget = activation_budget() if budget is None else budget

    def keep(level: int, t: torch.Tensor) -> None:
        nonlocal levels
        if levels is None or len(levels[level]) >= record:
            return
        kept[0] += t.numel() * t.element_size()
        if kept[0] > budget:  # layer-wise GLAS will run its own forward, storing level by level
            levels = None
            return
        levels[level].append(t.detach())

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
            keep(i, hs)
            calls[i].append((rest, dict(kwargs)))
            check(hs, f"entering {layout.layers[i].fqn}" + (" (the embedding output)" if i == 0 else
                                                              f" (the output of {layout.layers[i - 1].fqn})"))
        return hook

    def last_hook(module, args, output):
        check(_layer_output(output), f"at the output of {layout.layers[-1].fqn}")
        keep(len(layout.layers), _layer_output(output))

    handles = [layer.module.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layout.layers)]
    handles.append(layout.layers[-1].module.register_forward_hook(last_hook))
    try:
        with graphs if graphs is not None else nullcontext():  # its hooks after these: they see the inputs
            _forward_batches(model, batches)
    finally:
        for h in handles:
            h.remove()
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError(f"{layout.model_class}: the decoder layers in {layout.layers_fqn} were not each called "
                           "once per calibration batch; cannot run the sequential pipeline on this model")
    return (hidden, calls, levels) if record else (hidden, calls)


def _forward_batches(model: nn.Module, batches: list[CalibrationBatch]) -> None:
    base = _base_model(model)
    for b in batches:
        base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)


def _glas_batches(config, batches: list[CalibrationBatch]) -> int:
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


def lm_head_of(model: nn.Module):
    """``hidden -> logits`` (final norm, then the LM head) of a causal LM, or None without one."""
    norm = getattr(_base_model(model), "norm", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or lm_head is None:
        return None
    return lambda h: lm_head(norm(h))


def _layerwise_glas(model, layout: MoEModelLayout, config, batches, hidden, calls, boundaries=None,
                    expert_inputs: dict | None = None, graphs: KeptGraphs | None = None):
    """GLAS pair weights of the leading ``glas_samples`` batches, layer by layer
    (:mod:`~torchao_mobie.calibration.glas_layerwise`: equal to the whole-model backward pass).
    ``boundaries``: those batches' layer boundaries kept by :func:`capture_layer_inputs` (else recomputed);
    ``expert_inputs``: filled with the full-precision expert inputs of those batches (for :class:`FPShadow`);
    ``graphs``: the capture's kept graphs, when complete backpropagated instead of recomputing each layer."""
    head = lm_head_of(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}: GLAS needs the LM loss, so the model with its LM head "
                         "(*ForCausalLM); pass that, or a config with glas=False")
    n = _glas_batches(config, batches)
    loss = lambda h, b: lm_loss_sum(head(h), b)  # noqa: E731
    if graphs is not None and graphs.complete:
        infos = [None if layer.moe is None else layer.moe.experts for layer in layout.layers]
        return glas_from_graphs(graphs, infos, batches[:n], loss, power=config.glas_power, expert_inputs=expert_inputs)
    calls_n = [c[:n] for c in calls]
    layers = ModelLayers(layout)
    with ActivationStore() as store:
        if boundaries is not None and all(len(level) == n for level in boundaries):
            for i, level in enumerate(boundaries):
                store.put(i, level)
                level.clear()  # the store holds them now, and frees each level once GLAS has passed it
        else:
            forward_boundaries(layers, hidden[:n], calls_n, store)
        return layerwise_glas_weights(layers, batches[:n], calls_n, store, loss, power=config.glas_power,
                                      expert_inputs=expert_inputs)


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
    """``(W_router·diag(γ) [E, H], centered)`` of the MoE layers after ``index`` (γ: the RMSNorm the router
    input goes through; ``centered`` False for sigmoid routers with a score-correction bias, DeepSeek-V3),
    nearest first; for expert-shift-aware methods (NGES)."""
    out = []
    for layer in layout.layers[index + 1:]:
        if layer.moe is None or getattr(layer.moe.router, "weight", None) is None:
            continue
        wr = layer.moe.router.weight.detach().float()
        norm = getattr(layer.module, "post_attention_layernorm", None)
        gamma = getattr(norm, "weight", None)
        if isinstance(gamma, torch.Tensor) and gamma.shape == (wr.shape[1],):
            wr = wr * gamma.detach().float()[None, :]
        out.append((wr.cpu(), getattr(layer.moe.router, "e_score_correction_bias", None) is None))
    return out


def _align_router(layer: DecoderLayerInfo, hidden, calls, batches, targets, config, report: QuantizationReport,
                  heldloss: HeldbackLoss | None, replay: LayerReplay | None = None) -> None:
    """Router alignment of ``layer`` (``config.router_align``), with the held-back judge when asked for; both run
    the layer with the attention its gate_up stage recorded (``replay``)."""
    first = partial(attention_replayed, layer.module, replay, len(hidden))
    judge = None
    if heldloss is not None and getattr(config, "router_align_judge", False):
        judge = lambda: heldloss.per_sequence(layer.index, hidden, first)  # noqa: E731
    report.router_alignment[layer.moe.router_fqn] = align_router(layer, hidden, calls, batches, targets,
                                                                 config.router_align_ridge, judge=judge,
                                                                 first_layer=first)


def _heldback_loss(model: nn.Module, layout: MoEModelLayout, calls, batches: list[CalibrationBatch]) -> HeldbackLoss | None:
    """The held-back loss judge, when there are held-back batches and the model has its LM head."""
    head = lm_head_of(model)
    if not any(b.heldback for b in batches) or head is None:
        return None
    return HeldbackLoss([layer.module for layer in layout.layers], calls, batches, head, _layer_output)


def _run_stage(layer: DecoderLayerInfo, stage: _Stage, hidden, calls, batches, config: BinarizationConfig,
               report: QuantizationReport, events: list[FallbackEvent], glas=None, downstream=None,
               heldloss=None, plan_memory=None, shadow: FPShadow | None = None,
               replay: LayerReplay | None = None) -> LayerReplay | None:
    """Collect one stage's statistics over the calibration batches, then binarize its parameters.

    Returns a :class:`LayerReplay` (the experts module's calls per batch, its forward arguments, and the
    attention outputs) when the stage binarized ``gate_up_proj`` alone: nothing upstream of the experts changed, so the ``down_proj`` stage gets them as
    ``replay`` and feeds its collectors those calls instead of running the layer again (same inputs, same
    routing; the layer forward was a third of that stage's time). Such a stage also stops each forward at the
    experts' inputs: the experts and what follows them feed no statistic of it."""
    experts = None
    guided = {}
    fp = shadow is not None and shadow.expert_inputs is not None
    if stage.projections:
        experts = ExpertStatsCollector(layer.moe.experts, stage.projections,
                                       min_expert_tokens=config.min_expert_tokens,
                                       routing_weighted=routing_weighted(config),
                                       heldback=bool(getattr(config, "needs_heldback", False)),
                                       fp_target=fp,
                                       fp_target_all=fp and fp_target_refit(config, layer.moe.experts.num_experts)
                                       ).attach()
        if fp:
            experts.fp_gate_up = shadow.gate_up
        if glas is not None:
            guided = {p: GLASCollector(layer.moe.experts, (p,), min_expert_tokens=config.min_expert_tokens).attach()
                      for p in stage.projections}
            if glas.n_batches >= len(hidden):  # they observe the same calls as ``experts``, after it
                for c in guided.values():
                    c.share_from(experts)
    linears = [LinearStatsCollector(li.module, li.fqn).attach() for li in stage.linears]
    collectors = ([experts] if experts else []) + linears + list(guided.values())
    replay = replay if experts is not None and not linears and replay is not None and replay.complete(len(hidden)) \
        else None
    records = stage.projections == ("gate_up_proj",) and not linears
    # after the collectors' hooks: nothing past the experts' inputs is needed
    recorder = recording(layer.module, layer.moe.experts.module) if records else nullcontext()
    try:
        with recorder as record:
            for bi, (h, (args, kwargs), b) in enumerate(zip(hidden, calls, batches)):
                for c in collectors:
                    c.token_mask = b.token_mask
                if experts is not None:
                    experts.heldback_mask = torch.full((b.input_ids.numel(),), b.heldback, device=b.input_ids.device)
                    if fp:
                        experts.fp_hidden = shadow.batch(bi)
                for p, c in guided.items():  # None past the batches with gradients: the collector skips them
                    c.fp_routing = glas.batch(layer.moe.experts.fqn, p, bi) if bi < glas.n_batches else None
                if replay is None:
                    try:
                        layer.module(h, *args, **kwargs)
                    except StopLayer:
                        pass
                else:
                    for c in [experts, *guided.values()]:  # the hooks the experts module would have called
                        c._hook(layer.moe.experts.module, *replay.calls[bi])
    finally:
        for c in collectors:
            c.detach()

    for li, c in zip(stage.linears, linears):
        report.parameters[f"{li.fqn}.weight"] = apply_linear(li.module, c.finalize(), config, li.fqn).bits
    del linears
    if experts is not None:
        info = layer.moe.experts
        stats = experts.router_stats()
        if "gate_up_proj" in stage.projections:
            report.router_stats[layer.moe.fqn] = stats.to("cpu")
        for p in stage.projections:
            gh = guided[p].guided_hessian(p) if p in guided else None  # before its source frees what it shares
            hess = experts.finalize(p)
            name = f"{info.fqn}.{p}"
            report.parameters[name] = apply_experts(info, p, hess, config, name, router_stats=stats, guided_hessian=gh,
                                                     downstream_routers=downstream if p == "down_proj" else None,
                                                     judge=None if heldloss is None else
                                                     heldloss.judge(layer.index, hidden, info, p, partial(
                                                         attention_replayed, layer.module, record or replay,
                                                         len(hidden))),
                                                     plan_memory=plan_memory).bits
            events.append(hess.event)
            if hess.event.experts:
                report.fallback_events.append(hess.event)
            del hess
    return record if record is not None and record.complete(len(hidden)) else None


def next_inputs(layer: DecoderLayerInfo, hidden: list, calls: list, replay: LayerReplay | None) -> list:
    """The binarized layer's outputs (the next layer's inputs), its attention replayed when recorded."""
    with attention_replayed(layer.module, replay, len(hidden)):
        return [_layer_output(layer.module(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls)]


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
    tag_names(layout)
    scope = set(config.scope)
    experts, linears = selected_targets(layout, scope)
    targets = targets_of(experts, linears)
    for _, m, params in targets:
        check_not_binarized(m, params)
    check_not_requantizing(model, targets, config)
    for m in [e.module for e in experts] + [li.module for li in linears]:
        if getattr(m, OBSERVER, None) is not None:
            raise RuntimeError(f"{module_name(m)} has observers from step='observe'; finish that flow with step='convert' "
                               "instead of calling quantize_model")
    check_finite_weights(targets)
    check_packable(targets, config)

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    batches = calibration_batches(calibration, batch_size, device)
    check_calibration(model, batches)
    if getattr(config, "needs_heldback", False) and experts:
        batches = hold_back(batches, CalibrationBatch)
    report = QuantizationReport(config=type(config).__name__, calibration_tokens=sum(b.n_tokens for b in batches))

    was_training = model.training
    model.eval()
    layer = None
    try:
        # first: the full-precision forward also checks every layer's activations are finite, so bad
        # calibration data or weights fail here, before any weight is changed
        glas = None
        with RouterTargets(layout if getattr(config, "router_align", False) and experts else None) as targets:
            graphs = None
            if getattr(config, "needs_gradients", False) and experts:
                graphs = KeptGraphs(model, layout, _glas_batches(config, batches), activation_budget())
                hidden, calls, boundaries = capture_layer_inputs(model, layout, batches,
                                                                 record=_glas_batches(config, batches), graphs=graphs)
            else:
                hidden, calls = capture_layer_inputs(model, layout, batches)
        fp_target = getattr(config, "fp_target", False) and experts
        recorded = None
        if getattr(config, "needs_gradients", False) and experts:
            # GLAS over every batch recomputes each layer in full precision: the shadow takes its expert inputs
            recorded = {} if fp_target and _glas_batches(config, batches) == len(batches) else None
            glas = _layerwise_glas(model, layout, config, batches, hidden, calls, boundaries, expert_inputs=recorded,
                                   graphs=graphs)
            del boundaries, graphs
        heldloss = _heldback_loss(model, layout, calls, batches)
        shadow = FPShadow(hidden, _layer_output, recorded) if fp_target else None
        plan_memory: dict = {}
        from tqdm.auto import tqdm

        for layer in tqdm(layout.layers, desc=f"{type(config).__name__}: layers", disable=not progress):
            events: list[FallbackEvent] = []
            if shadow is not None:  # before anything of this layer is binarized
                shadow.advance(layer, calls[layer.index])
            replay = None
            for stage in _stages(layer, scope, true_sequential):
                replay = _run_stage(layer, stage, hidden, calls[layer.index], batches, config, report, events,
                                    glas=glas, downstream=_downstream_routers(layout, layer.index), heldloss=heldloss,
                                    plan_memory=plan_memory, shadow=shadow, replay=replay) or replay
            log_fallback_summary(layer.fqn, events)
            if layer.index in targets.logits:  # after its experts, before the next layer's inputs are made
                _align_router(layer, hidden, calls[layer.index], batches, targets.logits.pop(layer.index), config,
                              report, heldloss, replay)
            hidden = next_inputs(layer, hidden, calls[layer.index], replay)
            del replay
    except Exception as e:
        if report.parameters and hasattr(e, "add_note"):
            e.add_note(f"quantize_model stopped in {layer.fqn if layer is not None else '?'} after binarizing "
                       f"{len(report.parameters)} parameters in place (last: {list(report.parameters)[-1]}): the "
                       "model is partially quantized; reload the full-precision weights before retrying")
        raise
    finally:
        model.train(was_training)
    mark_quantized(model, config)
    if packs(config) and experts:  # last: every layer ran on the fake-quant weights, as with packed=False
        pack_model(model)
    report.wall_time_s = time.perf_counter() - t0
    logger.info("%s", report.summary())
    return report
