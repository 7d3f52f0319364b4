"""The full-precision model's activations, kept one layer ahead of the sequential pass.

The full-precision target (:mod:`~torchao_mobie.algorithms.fp_target`) fits each expert to the output the
full-precision model computed on the same calibration tokens, so it needs that model's expert inputs at the
layer being binarized. Storing them for every layer from the capture forward would cost one hidden state per
MoE layer; instead the shadow keeps the full-precision hidden states of one layer boundary and, before a
layer's first stage is binarized, runs that layer (still in full precision) on them: this records the experts
module's inputs per batch and moves the shadow to the next boundary. Cost: one more forward of each layer.
When layer-wise GLAS ran on every calibration batch it has recomputed each layer in full precision already
(:func:`~.glas_layerwise.layerwise_glas_weights` ``expert_inputs``); the shadow then takes those inputs and
runs nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["FPShadow"]


class FPShadow:
    """Full-precision hidden states at the current layer boundary (one tensor per calibration batch).

    After :meth:`advance` on an MoE layer: ``expert_inputs`` (the experts module's input rows per batch, fp32)
    and ``gate_up`` (the full-precision ``gate_up_proj`` ``[E, 2I, H]``, for ``down_proj``'s inputs).

    ``recorded``: every MoE layer's expert inputs per batch, keyed by experts fqn, from a pass that already
    ran the full-precision layers (layer-wise GLAS over every batch); :meth:`advance` then hands them out (and
    frees each layer's) instead of running the layer, and the shadow keeps no hidden states."""

    def __init__(self, hidden: list[torch.Tensor], output_of: Callable, recorded: dict | None = None):
        self.recorded = recorded
        self.hidden = None if recorded is not None else list(hidden)
        self.output_of = output_of
        self.expert_inputs: list[torch.Tensor] | None = None
        self.gate_up: torch.Tensor | None = None

    @torch.no_grad()
    def advance(self, layer, calls) -> None:
        """Run ``layer`` (a :class:`~..integrations.transformers.DecoderLayerInfo`, nothing of it binarized yet)
        on the shadow's hidden states with its per-batch ``calls``."""
        info = None if layer.moe is None else layer.moe.experts
        seen: list[torch.Tensor] = []
        handle = None
        self.expert_inputs = self.gate_up = None
        if info is not None:
            self.gate_up = info.weight("gate_up_proj").detach().clone()
        if self.recorded is not None:  # the full-precision pass already ran: nothing to run here
            if info is not None:
                seen = self.recorded.pop(info.fqn, [])
        else:
            if info is not None:
                handle = info.module.register_forward_pre_hook(
                    lambda m, args, kwargs: seen.append(
                        info.call(args, kwargs).hidden.detach().float().reshape(-1, info.hidden_dim)),
                    with_kwargs=True)
            try:
                self.hidden = [self.output_of(layer.module(h, *args, **kwargs)) for h, (args, kwargs) in
                               zip(self.hidden, calls)]
            finally:
                if handle is not None:
                    handle.remove()
        if info is not None:
            if len(seen) != len(calls):
                raise RuntimeError(f"{info.fqn}: {len(seen)} full-precision expert inputs for {len(calls)} calibration "
                                   "batches; cannot pair the full-precision inputs with the quantized ones")
            self.expert_inputs = seen

    def batch(self, i: int) -> torch.Tensor | None:
        return None if self.expert_inputs is None else self.expert_inputs[i]
