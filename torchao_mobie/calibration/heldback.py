"""Held-back calibration sequences, and the global loss they measure for a candidate weight.

MoBiE chooses each projection's layout (joint backbone on either side, or per-expert factors) by fitting
every candidate on the other calibration sequences and judging it here: the language-model loss of the
held-back sequences when the candidate replaces the projection, run from the current layer to the LM
head (earlier layers as already quantized, later ones at full precision). Layer-level proxies misranked
the layouts: on the DeepSeek-V3-style held-out model, the MoE-block output error of the held-back tokens
(cross-expert terms included) preferred a joint down_proj by 2-10% in every layer, while the model with
per-expert down_proj factors had the lower loss, on the held-back sequences (gap 0.0194 vs 0.0236) as on
WikiText-2 test (0.0196 vs 0.0235).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from ..eval.metrics import token_nll

__all__ = ["HeldbackLoss", "HELDBACK_EVERY", "hold_back"]

HELDBACK_EVERY = 4  # every 4th calibration sequence is held back


class HeldbackLoss:
    """The LM loss of the held-back batches of a sequential pass.

    layers: the decoder layer modules in order; calls: ``calls[i][b]`` the ``(args, kwargs)`` layer i gets
    for batch b; batches: every calibration batch (``input_ids``, ``attention_mask``, ``heldback``);
    head: final norm + LM head, ``hidden -> logits``; layer_output: a layer's hidden states from its output.
    """

    def __init__(self, layers, calls, batches, head: Callable, layer_output: Callable):
        self.layers, self.calls, self.head, self.layer_output = layers, calls, head, layer_output
        self.held = [i for i, b in enumerate(batches) if b.heldback]
        self.batches = batches

    @torch.no_grad()
    def judge(self, start: int, hidden: list, experts, projection: str,
              first_layer: Callable = nullcontext) -> Callable[[torch.Tensor], float] | None:
        """``W_hat [E, out, in] -> [S]`` mean NLL of each held-back sequence with ``W_hat`` as ``projection``
        of ``experts`` (in layer ``start``, whose inputs per batch are ``hidden``); the weight is restored
        after each call. ``first_layer(held)``: a context for layer ``start``'s run on the held-back batches
        (the pipeline replays its recorded attention there)."""
        if not self.held:
            return None

        @torch.no_grad()
        def loss(W_hat: torch.Tensor) -> torch.Tensor:
            param = experts.parameter(projection)
            saved = param.data.clone()
            experts.set_weight(projection, W_hat)
            try:
                return self.per_sequence(start, hidden, first_layer)
            finally:
                param.data.copy_(saved)

        return loss

    @torch.no_grad()
    def per_sequence(self, start: int, hidden: list, first_layer: Callable = nullcontext) -> torch.Tensor:
        """``[S]`` mean NLL of each held-back sequence with the model's current weights, run from layer
        ``start`` (inputs per batch: ``hidden``)."""
        per_seq = []
        with first_layer(self.held):
            h_start = [self.layer_output(self.layers[start](hidden[b], *self.calls[start][b][0],
                                                            **self.calls[start][b][1])) for b in self.held]
        for b, h in zip(self.held, h_start):
            for i in range(start + 1, len(self.layers)):
                args, kwargs = self.calls[i][b]
                h = self.layer_output(self.layers[i](h, *args, **kwargs))
            logits = self.head(h).float()
            ids, mask = self.batches[b].input_ids, self.batches[b].attention_mask
            nll = token_nll(logits, ids).double()
            keep = torch.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).double()
            per_seq.append((nll * keep).sum(1) / keep.sum(1).clamp_min(1))
        return torch.cat(per_seq)


def hold_back(batches: list, make_batch: Callable) -> list:
    """The batches with the rows of every 4th calibration sequence moved into held-back batches of their own
    (appended after the others, so leading-batch subsets such as GLAS's ``glas_samples`` skip them)."""
    kept, held, seen = [], [], 0
    for b in batches:
        rows = b.input_ids.shape[0]
        is_held = (torch.arange(seen, seen + rows) % HELDBACK_EVERY) == HELDBACK_EVERY - 1
        seen += rows
        for sel, out, flag in ((~is_held, kept, False), (is_held, held, True)):
            if bool(sel.any()):
                idx = sel.nonzero().flatten().to(b.input_ids.device)
                mask = None if b.attention_mask is None else b.attention_mask.index_select(0, idx)
                out.append(make_batch(b.input_ids.index_select(0, idx), mask, flag))
    return kept + held
