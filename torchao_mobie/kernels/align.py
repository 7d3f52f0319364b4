"""``moe_align_block_size`` in plain PyTorch (the vLLM fused_moe idea), with no host synchronisation.

Pairs ``p = t * top_k + j`` are sorted by expert and each expert's run is padded up to a multiple of
``block_m``, so that every ``block_m`` rows of the sorted list belong to one expert. All output sizes
depend only on ``(num_pairs, num_experts, block_m)``: the worst case ``num_pairs + E * (block_m - 1)``
slots is allocated up front, and blocks past ``num_tokens_post_padded`` are skipped inside the kernel,
so the whole thing is CUDA-graph friendly (no ``.tolist()``, ``nonzero()`` or ``bincount``).
"""

from __future__ import annotations

import torch

__all__ = ["moe_align_block_size", "max_padded_slots"]


def max_padded_slots(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static length of ``sorted_pair_ids`` (a multiple of ``block_m``)."""
    worst = num_pairs + num_experts * (block_m - 1)
    return (worst + block_m - 1) // block_m * block_m


def moe_align_block_size(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, expert) pairs by expert, padding each expert to a multiple of ``block_m``.

    ``expert_ids``: ``[T, top_k]`` or flat ``[P]`` expert index per pair.
    Returns ``(sorted_pair_ids [S] int32, block_expert [S // block_m] int32, num_post_padded [1] int32)``;
    padding slots hold ``P`` (one past the last pair), blocks past ``num_post_padded`` hold an arbitrary
    (in-range) expert and must not be computed. Experts with no pairs get no block.
    """
    ids = expert_ids.reshape(-1).to(torch.int64)
    P = ids.numel()
    dev = ids.device
    S = max_padded_slots(P, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert (unpadded)
    order = torch.argsort(ids, stable=True)
    sorted_e = ids[order]
    rank = torch.arange(P, device=dev) - first[sorted_e]
    dest = starts[sorted_e] + rank
    sorted_pair_ids = torch.full((S,), P, dtype=torch.int32, device=dev)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, S, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    num_post_padded = ends[-1:].to(torch.int32)
    return sorted_pair_ids, block_expert, num_post_padded
