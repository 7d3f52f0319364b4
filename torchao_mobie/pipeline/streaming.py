"""Streaming quantization: a checkpoint directory in, a packed checkpoint directory out, one decoder layer in
memory at a time, resumable after a crash.

:func:`quantize_streaming` runs exactly :func:`~.sequential.quantize_model`'s algorithm (the same stages,
statistics, GLAS weights, held-back judge, NGES routers and plan memory, in the same order on the same
values, so the packed tensors are bit-identical), but the model is a meta-device skeleton (built from
``config.json``, as ``from_pretrained`` builds it) whose parts are materialized from the shards only while
they are needed (:class:`~torchao_mobie.storage.hub_checkpoint.HubCheckpoint`, with transformers' key
conversion):

* embeddings, final norm, head and rotary tables: for the whole run (they are small);
* the per-layer ``(args, kwargs)`` and layer-0 inputs: one forward of the skeleton with every decoder layer
  replaced by a stub that records its call;
* GLAS: layer-wise (:mod:`~torchao_mobie.calibration.glas_layerwise`), each layer loaded twice (forward,
  then recompute + backward), boundaries in an :class:`~torchao_mobie.calibration.activations.ActivationStore`;
* router alignment (``MoBiEConfig.router_align``): the full-precision router logits from one more forward,
  layer by layer (:func:`_fp_pass`);
* the full-precision target (``MoBiEConfig.fp_target``): each layer is run once at full precision on the
  shadow's hidden states before it is binarized (:class:`~torchao_mobie.calibration.fp_shadow.FPShadow`); on
  resume, the shadow's hidden states come from a full-precision forward up to the first layer left;
* the sequential pass: layer ``i`` loaded, calibrated and binarized stage by stage from the activations the
  already-binarized layers produced, run once more to produce layer ``i+1``'s inputs, packed, written as
  its own shard, and freed (back to meta). The held-back judge of the first (probe) layer runs the later
  layers at full precision, loading each in turn.

Memory: one decoder layer (plus one more while the judge runs it) and its statistics, the calibration
activations of one boundary, the small non-layer modules; it does not grow with depth. Each finished layer
is committed atomically with the activations it produced (:mod:`.stream_state`), so rerunning the same
call after a crash continues after the last finished layer and writes the same bytes; other settings refuse
to resume into that directory. ``MOBIE_STREAM_FAIL_AFTER=k`` makes a run fail right after committing layer
``k`` (tests of the resume path).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..calibration import FallbackEvent, log_fallback_summary
from ..calibration.activations import ActivationStore
from ..calibration.fp_shadow import FPShadow
from ..calibration.glas_layerwise import forward_boundaries, layerwise_glas_weights, lm_loss_sum
from ..calibration.heldback import HeldbackLoss, hold_back
from ..calibration.router_align import RouterTargets
from ..integrations.transformers import PROJECTIONS, discover_moe_layout
from ..marker import mark_packed, mark_quantized
from ..methods.base import BinarizationConfig
from ..algorithms.result import BitBudget
from ..storage.convert import FACTORS_ATTR, pack_projection, packs
from ..storage.hf_quantizer import attach_quantizer
from ..storage.hub_checkpoint import DTYPE_BYTES, HubCheckpoint, tensor_sizes
from ..storage.serialization import flatten_state_dict
from .. import workers
from .batches import CalibrationBatch, calibration_batches, check_calibration
from .guards import check_packable, targets_of
from .handler import selected_targets, tag_names
from .report import RECORDS, QuantizationReport
from .sequential import _align_router, _downstream_routers, _forward_batches, _glas_batches, _layer_output, _run_stage, \
    _stages, lm_head_of, next_inputs
from .stream_state import StreamState, atomic_save_file, atomic_write_bytes, calibration_digest, settings_of

__all__ = ["quantize_streaming", "FAIL_AFTER_ENV"]

logger = logging.getLogger("torchao_mobie")
FAIL_AFTER_ENV = "MOBIE_STREAM_FAIL_AFTER"


class StreamFault(RuntimeError):
    """The injected failure of ``MOBIE_STREAM_FAIL_AFTER``."""


def _set(module: nn.Module, name: str, value: nn.Parameter | torch.Tensor, buffer: bool = False) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if buffer:
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value if isinstance(value, nn.Parameter) else nn.Parameter(value))


class _Layers:
    """The skeleton's decoder layers, materialized from the checkpoint on demand (``open(i)`` for GLAS,
    ``runner(i)`` for the held-back judge) and freed back to the meta device."""

    def __init__(self, model: nn.Module, layout, ckpt: HubCheckpoint):
        self.model, self.layout, self.ckpt = model, layout, ckpt
        self.live: set[int] = set()

    def __len__(self):
        return len(self.layout.layers)

    def materialize(self, i: int) -> None:
        layer = self.layout.layers[i]
        module = layer.module
        if any(b is not None for _, b in module.named_buffers()):
            nonpersistent = [n for n, _ in module.named_buffers() if f"{layer.fqn}.{n}" not in self.ckpt.plan]
            if nonpersistent:
                raise NotImplementedError(f"{layer.fqn}: decoder layers with non-persistent buffers ({nonpersistent[0]}) "
                                          "cannot be streamed; use quantize_model on the loaded model")
        params = [n for n, _ in module.named_parameters()]
        buffers = [n for n, _ in module.named_buffers()]
        tensors = self.ckpt.load([f"{layer.fqn}.{n}" for n in params + buffers])
        for n in params:
            _set(module, n, tensors[f"{layer.fqn}.{n}"])
        for n in buffers:
            _set(module, n, tensors[f"{layer.fqn}.{n}"], buffer=True)
        self.live.add(i)

    def free(self, i: int) -> None:
        module = self.layout.layers[i].module
        for n, p in list(module.named_parameters()):
            _set(module, n, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
        for n, b in list(module.named_buffers()):
            _set(module, n, torch.empty(b.shape, dtype=b.dtype, device="meta"), buffer=True)
        for m in module.modules():
            for attr in (FACTORS_ATTR, RECORDS):
                if attr in m.__dict__:
                    delattr(m, attr)
        self.live.discard(i)

    @contextmanager
    def open(self, i: int):
        self.materialize(i)
        try:
            layer = self.layout.layers[i]
            yield layer.module, (layer.moe.experts if layer.moe is not None else None)
        finally:
            self.free(i)

    def runner(self, i: int):
        def run(h, *args, **kwargs):
            if i in self.live:
                return self.layout.layers[i].module(h, *args, **kwargs)
            with self.open(i) as (module, _):
                return module(h, *args, **kwargs)
        return run


class _Stub(nn.Module):
    """Stands in for decoder layer ``i`` during the call capture: records ``(args, kwargs)`` and returns its
    input (the layer's plain attributes, e.g. ``attention_type``, are copied for the model's loop)."""

    def __init__(self, layer: nn.Module, i: int, calls: list, hidden: list):
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)):
                object.__setattr__(self, k, v)
        self.i, self.calls, self.hidden = i, calls, hidden

    def forward(self, *args, **kwargs):
        if args:
            hs, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hs, rest = kwargs.pop("hidden_states"), ()
        if self.i == 0:
            hs_ok = bool(torch.isfinite(hs).all())
            if not hs_ok:
                raise FloatingPointError("non-finite calibration activations (NaN/Inf) at the embedding output")
            self.hidden.append(hs.detach())
        self.calls[self.i].append((rest, dict(kwargs)))
        return hs


@torch.no_grad()
def _capture_calls(model: nn.Module, layout, batches):
    container = model.get_submodule(layout.layers_fqn)
    originals = list(container)
    calls: list[list] = [[] for _ in originals]
    hidden: list = []
    try:
        for i, layer in enumerate(originals):
            container[i] = _Stub(layer, i, calls, hidden)
        _forward_batches(model, batches)
    finally:
        for i, layer in enumerate(originals):
            container[i] = layer
    return hidden, calls


@torch.no_grad()
def _fp_pass(layers: "_Layers", layout, hidden, calls, upto: int, routers: bool, keep: int = 0):
    """The full-precision forward of layers ``0..upto-1``, one loaded at a time. Returns the hidden states at
    layer boundary ``keep`` (the full-precision target's shadow, when resuming after layer ``keep - 1``) and,
    with ``routers``, every MoE router's full-precision logits per calibration batch (router alignment: the
    forward :func:`~.sequential.capture_layer_inputs` makes in memory). Run again on resume."""
    h, kept = list(hidden), list(hidden)
    with RouterTargets(layout if routers else None) as targets:
        for i in range(upto):
            with layers.open(i) as (module, _):
                h = [_layer_output(module(x, *args, **kwargs)) for x, (args, kwargs) in zip(h, calls[i])]
            if i + 1 == keep:
                kept = h
    return kept, targets.logits


def _materialize_names(model: nn.Module, ckpt: HubCheckpoint, names) -> None:
    params = dict(model.named_parameters())
    tensors = ckpt.load(names)
    for n in names:
        _set(model, n, tensors[n], buffer=n not in params)


def _materialize_outside(model: nn.Module, layout, ckpt: HubCheckpoint) -> None:
    """Embeddings, final norm, head (tied or not) and buffers outside the decoder layers."""
    prefix = layout.layers_fqn + "."
    names = [n for n in ckpt.targets() if not n.startswith(prefix)]
    _materialize_names(model, ckpt, names)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight.is_meta and getattr(model.config, "tie_word_embeddings", False):
        out.weight = inp.weight
    for mname, mod in model.named_modules():
        if mname == layout.layers_fqn or mname.startswith(prefix):
            continue
        meta = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if meta:  # non-persistent tables (rotary inv_freq): computed by from_pretrained's init, as here
            for n in meta:
                mod._buffers[n] = torch.empty_like(mod._buffers[n], device="cpu")
            model._init_weights(mod)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and not n.startswith(prefix)]
    if missing:
        raise ValueError(f"{ckpt.model_dir}: no checkpoint tensor for {missing[0]}")


def _router_terms(model, layout, ckpt) -> list:
    """NGES's downstream router terms (``_downstream_routers``) of every MoE layer, computed once from the
    checkpoint's router and norm weights; ``downstream(i)`` is the tail after layer ``i``."""
    names = []
    for layer in layout.layers:
        if layer.moe is not None and getattr(layer.moe.router, "weight", None) is not None:
            names.append(f"{layer.moe.router_fqn}.weight")
            if isinstance(getattr(getattr(layer.module, "post_attention_layernorm", None), "weight", None), torch.Tensor):
                names.append(f"{layer.fqn}.post_attention_layernorm.weight")
    names = [n for n in names if n in ckpt.plan]
    _materialize_names(model, ckpt, names)
    terms = _downstream_routers(layout, -1)
    for n in names:
        t = model.get_parameter(n)
        _set(model, n, nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False))
    moe = [layer.index for layer in layout.layers
           if layer.moe is not None and getattr(layer.moe.router, "weight", None) is not None]
    return [[t for t, j in zip(terms, moe) if j > i] for i in range(len(layout.layers))]


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _cast_params(sd: dict, params: set, dtype) -> dict:
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if k in params and type(v) is torch.Tensor and v.is_floating_point() else v)
            for k, v in sd.items()}


def _write_shard(path: Path, sd: dict, packed: bool) -> list[str]:
    if packed:
        tensors, meta = flatten_state_dict(sd)
    else:
        tensors, meta = {k: v.detach().contiguous() for k, v in sd.items()}, {"format": "pt"}
    if workers.is_writer():
        atomic_save_file(tensors, path, meta)
    return sorted(tensors)


def _maybe_fail(done: int) -> None:
    v = os.environ.get(FAIL_AFTER_ENV)
    if v and int(v) == done:
        raise StreamFault(f"{FAIL_AFTER_ENV}={v}: injected failure after committing layer {done - 1}")


def quantize_streaming(model_dir, out_dir, config: BinarizationConfig, calibration, *, batch_size: int = 8,
                       true_sequential: bool = True, dtype: torch.dtype = torch.float32,
                       experts_implementation: str | None = "grouped_mm", save_dtype: torch.dtype | None = None,
                       progress: bool = True) -> QuantizationReport:
    """Quantize the checkpoint in ``model_dir`` (safetensors, one file or hub shards) layer by layer into
    ``out_dir`` (see the module docstring); ``from_pretrained(out_dir)`` loads the result as it loads a
    ``quantize_model`` + ``save_pretrained`` one. ``dtype``/``experts_implementation``: as the model would be
    loaded for :func:`quantize_model` (the results match that run bit for bit); ``save_dtype``: the dtype of
    the unquantized weights written (None: ``dtype``). Returns the :class:`QuantizationReport` of every layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    if not isinstance(config, BinarizationConfig) or config.step != "convert":
        raise ValueError("quantize_streaming needs a BinarizationConfig with step='convert'")
    model_dir, out = Path(model_dir), Path(out_dir)
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        kw = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **kw)
    model.eval()
    ckpt = HubCheckpoint(model_dir, model)
    layout = discover_moe_layout(model)
    tag_names(layout)
    scope = set(config.scope)
    experts, linears = selected_targets(layout, scope)
    check_packable(targets_of(experts, linears), config)
    packed = packs(config) and bool(experts)
    _materialize_outside(model, layout, ckpt)
    downstream = _router_terms(model, layout, ckpt)
    batches = calibration_batches(calibration, batch_size, torch.device("cpu"))
    check_calibration(model, batches)
    if getattr(config, "needs_heldback", False) and experts:
        batches = hold_back(batches, CalibrationBatch)
    report = QuantizationReport(config=type(config).__name__, calibration_tokens=sum(b.n_tokens for b in batches))
    n_layers = len(layout.layers)
    state = StreamState(out, settings_of(config, checkpoint=ckpt.fingerprint(), calibration=calibration_digest(batches),
                                         batch_size=batch_size, true_sequential=true_sequential, dtype=dtype,
                                         experts_implementation=experts_implementation, save_dtype=save_dtype),
                        n_layers, writer=workers.is_writer())
    done = state.open()
    hidden, calls = _capture_calls(model, layout, batches)
    layers = _Layers(model, layout, ckpt)
    head = lm_head_of(model)
    glas = None
    if getattr(config, "needs_gradients", False) and experts and done < n_layers:
        glas = state.load_glas()
        if glas is None:
            n = _glas_batches(config, batches)
            with ActivationStore() as store:
                forward_boundaries(layers, hidden[:n], [c[:n] for c in calls], store)
                glas = layerwise_glas_weights(layers, batches[:n], [c[:n] for c in calls], store,
                                              lambda h, b: lm_loss_sum(head(h), b), power=config.glas_power)
            state.save_glas(glas)
    align = bool(getattr(config, "router_align", False) and experts and done < n_layers)
    shadow = FPShadow(hidden, _layer_output) if getattr(config, "fp_target", False) and experts and done < n_layers \
        else None
    targets = {}
    upto = max(1 + max((layer.index for layer in layout.layers if layer.moe is not None), default=-1) if align else 0,
               done if shadow is not None else 0)
    if upto:
        shadow_hidden, targets = _fp_pass(layers, layout, hidden, calls, upto, align, keep=done)
        if shadow is not None:
            shadow.hidden = shadow_hidden
    if 0 < done < n_layers:
        hidden = state.resume_hidden([h.device for h in hidden])
    plan_memory = state.plan_memory()
    workers.barrier()  # every rank has read the saved state before rank 0 moves on (and removes some of it)
    heldloss = None
    if any(b.heldback for b in batches) and head is not None:
        heldloss = HeldbackLoss([layers.runner(i) for i in range(n_layers)], calls, batches, head, _layer_output)
    from tqdm.auto import tqdm

    for layer in tqdm(layout.layers[done:], desc=f"{type(config).__name__}: streaming layers", disable=not progress):
        layers.materialize(layer.index)
        try:
            with torch.no_grad():
                events: list[FallbackEvent] = []
                if shadow is not None:
                    shadow.advance(layer, calls[layer.index])
                replay = None
                for stage in _stages(layer, scope, true_sequential):
                    replay = _run_stage(layer, stage, hidden, calls[layer.index], batches, config, report, events,
                                        glas=glas, downstream=downstream[layer.index], heldloss=heldloss,
                                        plan_memory=plan_memory, shadow=shadow, replay=replay) or replay
                log_fallback_summary(layer.fqn, events)
                if layer.index in targets:
                    _align_router(layer, hidden, calls[layer.index], batches, targets.pop(layer.index), config,
                                  report, heldloss, replay)
                hidden = next_inputs(layer, hidden, calls[layer.index], replay)
                del replay
            if packed and layer.moe is not None:
                for proj in PROJECTIONS:
                    pack_projection(layer.moe.experts.module, proj, layer.moe.experts.fqn)
            params = {f"{layer.fqn}.{n}" for n, _ in layer.module.named_parameters()}
            sd = _cast_params({f"{layer.fqn}.{k}": v for k, v in layer.module.state_dict().items()}, params, save_dtype)
            shard = _shard_name(layer.index + 2, n_layers + 1)
            keys = _write_shard(out / shard, sd, packed)
            bits = {k: vars(b) for k, b in report.parameters.items() if k.startswith(layer.fqn + ".")}
            state.commit_layer(layer.index, shard, keys, hidden, bits, plan_memory)
        finally:
            layers.free(layer.index)
        _maybe_fail(layer.index + 1)
    if workers.is_writer():
        _finish(model, model_dir, out, layout, state, config, packed, dtype, save_dtype, n_layers)
    report.parameters = {k: BitBudget(**v) for k, v in state.manifest["parameters"].items()}
    report.wall_time_s = time.perf_counter() - t0
    ckpt.close()
    logger.info("%s", report.summary())
    return report


def _finish(model, model_dir: Path, out: Path, layout, state: StreamState, config, packed: bool, dtype, save_dtype,
            n_layers: int) -> None:
    """The non-layer shard, ``config.json`` (quantization config and marker) and the shard index."""
    prefix = layout.layers_fqn + "."
    params = {n for n, _ in model.named_parameters()}
    sd, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(prefix) or id(v) in seen:  # a tied head is written once, as the embeddings
            continue
        seen.add(id(v))
        sd[k] = v.detach()
    shard = _shard_name(1, n_layers + 1)
    keys = _write_shard(out / shard, _cast_params(sd, params, save_dtype), packed)
    mark_quantized(model, config)
    if packed:
        mark_packed(model)
        attach_quantizer(model)
    model.config.dtype = save_dtype or dtype
    model.config.save_pretrained(out)
    shards = dict(state.manifest["shards"], **{shard: keys})
    weight_map = {k: s for s, ks in sorted(shards.items()) for k in ks}
    total = sum(n * DTYPE_BYTES[dt] for dt, n in tensor_sizes(out / s for s in sorted(shards)))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    state.finish(shard, keys)

