"""Group (token, expert) routing pairs by expert, the way grouped-GEMM MoE kernels do.

``top_k_index [T, k]`` becomes one sorted list of token ids with per-expert segment boundaries, so
statistics are accumulated per expert with one matmul over a contiguous slice instead of a loop over
tokens. One host sync (``counts.tolist()``) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutedTokens", "route_tokens"]


@dataclass
class RoutedTokens:
    """Routing pairs of one batch grouped by expert.

    token_idx: ``[P]`` token index of every valid pair, sorted by expert (stable: token order kept).
    counts: ``[E]`` pairs per expert (int64).
    pair_weights: ``[P]`` weight per pair in the same order, or None (uniform).
    """

    token_idx: torch.Tensor
    counts: torch.Tensor
    pair_weights: torch.Tensor | None

    def segments(self):
        """Yield ``(expert, start, end)`` for every expert that received at least one pair."""
        start = 0
        for e, n in enumerate(self.counts.tolist()):
            if n:
                yield e, start, start + n
            start += n


def route_tokens(top_k_index: torch.Tensor, num_experts: int, *, token_mask: torch.Tensor | None = None,
                 pair_weights: torch.Tensor | None = None) -> RoutedTokens:
    """Sort the pairs of ``top_k_index [T, k]`` by expert.

    Indices outside ``[0, num_experts)`` (the "no expert" slot used by expert parallelism) are dropped,
    as are tokens where ``token_mask [T]`` is False (padding).
    """
    t = top_k_index.shape[0]
    idx = top_k_index.reshape(t, -1)
    k = idx.shape[1]
    flat = idx.reshape(-1).long()
    tokens = torch.arange(t, device=idx.device).repeat_interleave(k)
    valid = (flat >= 0) & (flat < num_experts)
    if token_mask is not None:
        valid &= token_mask.reshape(-1).to(device=idx.device, dtype=torch.bool)[tokens]
    w = None if pair_weights is None else pair_weights.reshape(-1)
    if not bool(valid.all()):
        flat, tokens = flat[valid], tokens[valid]
        w = None if w is None else w[valid]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return RoutedTokens(token_idx=tokens[order], counts=counts, pair_weights=None if w is None else w[order])
