"""What happens to experts that the calibration data (almost) never routes to.

An expert that saw ``n < min_expert_tokens`` routed tokens has a Hessian of rank ``< n`` built from a
handful of samples; error compensation then fits those few tokens and ignores every other input
direction. Such experts use a layer-level Hessian instead:

* ``gate_up_proj``: ``E[x xᵀ]`` over *all* tokens entering the experts module of that layer (the
  inputs every expert may receive);
* ``down_proj``: ``E[a aᵀ]`` with ``a = act(gate(x))·up(x)`` computed *with that expert's own
  gate_up weights* over all tokens entering the layer. (Pooling other experts' down inputs would be
  meaningless: intermediate neuron ``j`` of one expert has nothing to do with neuron ``j`` of
  another.) The collector accumulates this only for experts still below the threshold, so it costs
  nothing once every expert has enough tokens.

Default ``min_expert_tokens = 16``: the relative standard error of a second-moment estimate from ``n``
samples is about ``sqrt(2/n)`` (35 % at 16, 50 % at 8), and an expert below 16 tokens in a calibration
set of ``N·k`` routed tokens (typically 10^4-10^6) carries < 0.1 % of the routed compute, so the pooled
estimate is the safer choice there while every expert that the data actually uses keeps its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["DEFAULT_MIN_EXPERT_TOKENS", "FallbackEvent", "log_fallback_summary"]

logger = logging.getLogger("torchao_mobie.calibration")

DEFAULT_MIN_EXPERT_TOKENS = 16


@dataclass
class FallbackEvent:
    """Experts of one projection whose Hessian was replaced by the layer-level one."""

    module: str  # experts module fqn ("" when unknown, e.g. torchao handlers)
    projection: str  # "gate_up_proj" | "down_proj"
    experts: list[int]
    token_counts: list[int]
    min_expert_tokens: int
    layer_tokens: int
    experts_total: int = 0
    notes: list[str] = field(default_factory=list)


def log_fallback_summary(where: str, events: list[FallbackEvent]) -> None:
    """One log line for all fallback events of one layer (nothing when there are none)."""
    events = [e for e in events if e.experts]
    if not events:
        return
    parts = []
    for ev in events:
        pairs = ", ".join(f"{e}:{n}" for e, n in zip(ev.experts, ev.token_counts))
        parts.append(f"{ev.projection} {len(ev.experts)}/{ev.experts_total} experts (expert:tokens {pairs})"
                     + "".join(f"; {n}" for n in ev.notes))
    ev0 = events[0]
    logger.warning(
        "%s: experts below min_expert_tokens=%d use the layer-level Hessian over all %d tokens entering the "
        "experts: %s", where, ev0.min_expert_tokens, ev0.layer_tokens, "; ".join(parts))
