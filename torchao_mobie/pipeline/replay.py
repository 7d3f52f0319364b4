"""What a layer's gate_up stage records, so the rest of that layer's pass does not compute it again.

The gate_up stage runs the layer on every calibration batch up to the experts' inputs, with the layer's
attention already final: attention linears are binarized, if at all, in earlier stages, and router
alignment acts after attention. So, with the same inputs and the same weights:
- the down_proj stage feeds its collectors the recorded experts calls instead of running the layer again
  (the layer forward was a third of that stage's time);
- the re-run that makes the next layer's inputs, the held-back judge's run of the layer it judges and router
  alignment's run up to the router take the recorded attention outputs instead of running attention again
  (same bits; on olmoe-32e ~8 ms of a ~25 ms layer forward, 32 forwards a run for the first alone).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["LayerReplay", "StopLayer", "recording", "attention_replayed"]


class StopLayer(Exception):
    """Raised by the gate_up stage's experts pre-hook: the rest of the layer's forward is not needed."""


@dataclass
class LayerReplay:
    calls: list = field(default_factory=list)  # the experts module's (args, kwargs), per batch
    attention: list | None = None  # the attention module's outputs, per batch (None: not recorded)

    def complete(self, n: int) -> bool:
        return len(self.calls) == n


def _attention(layer_module: nn.Module) -> nn.Module | None:
    attn = getattr(layer_module, "self_attn", None)  # every transformers MoE family's decoder layer
    return attn if isinstance(attn, nn.Module) and "forward" not in vars(attn) else None


@contextmanager
def recording(layer_module: nn.Module, experts_module: nn.Module):
    """Yields a :class:`LayerReplay` filled while the layer runs; each forward stops at the experts' inputs
    (:class:`StopLayer`), after the statistics hooks registered before this one."""
    rec = LayerReplay()
    attn = _attention(layer_module)
    handles = []
    if attn is not None:
        rec.attention = []
        handles.append(attn.register_forward_hook(lambda m, a, out: rec.attention.append(out)))

    def keep_call(module, args, kwargs):
        rec.calls.append((args, kwargs))
        raise StopLayer

    handles.append(experts_module.register_forward_pre_hook(keep_call, with_kwargs=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        if rec.attention is not None and len(rec.attention) != len(rec.calls):
            rec.attention = None  # attention ran without reaching the experts (or the reverse): not replayable


def _copy(out):
    return tuple(_copy(o) for o in out) if isinstance(out, tuple) else out.clone() if isinstance(out, Tensor) else out


@contextmanager
def attention_replayed(layer_module: nn.Module, replay: LayerReplay | None, n: int, batches: list | None = None):
    """The layer's attention returns the recorded outputs, in batch order, for the next calls: every batch's
    (``n`` of them, when ``replay`` recorded all ``n``), or copies of those of ``batches`` (the held-back
    judge and router alignment, which may run the layer more than once). Otherwise attention runs as usual."""
    attn = _attention(layer_module)
    if attn is None or replay is None or replay.attention is None or len(replay.attention) != n:
        yield
        return
    outputs = iter(replay.attention if batches is None else [replay.attention[b] for b in batches])
    attn.forward = (lambda *args, **kwargs: next(outputs)) if batches is None else \
        (lambda *args, **kwargs: _copy(next(outputs)))
    try:
        yield
    finally:
        del attn.forward
