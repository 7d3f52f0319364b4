"""Expert chunks: the memory rule of CEJD's per-expert work.

Every step of the factor problem (:mod:`.cejd_factor`) is independent per expert, but run batched over all
``E`` experts its temporaries scale with ``E``: ``[E, n, n]`` right metrics (times ``(1 + P)²`` for stacked
planes), ``[E, m, m]`` row-scale systems under a left metric, their solves. With 512 experts of width 512
(Qwen3-Next's layout) one such temporary is 0.5-2 GB and a fit held a dozen of them (over 9 GB on a
64-wide toy model). So the driver runs those steps on slices of experts sized by :func:`expert_chunks`:
the largest per-expert temporary times the chunk stays under :data:`CHUNK_BYTES`, in multiples of
:data:`CHUNK_ALIGN` experts. Per-expert results do not depend on the slicing: the batched kernels compute
each expert alone, but oneMKL's solves and products take alignment-dependent paths, so a chunk must give
each expert's matrices the address (modulo 64 bytes) it has in the whole batch, which chunks starting at
multiples of 16 experts do for fp32 and fp64 (the zoo's packed hashes are the same with chunks of 16; with
chunks of 5 they are not). The budget only trades memory for kernel-call overhead (a 16-expert chunk
may pass it: the floor, up to 4x; past that, one expert per chunk, without the alignment).

What stays whole: the weights ``[E, m, n]`` and the per-expert Hessians ``[E, n, n]`` the caller holds
(the layer's own statistics), and the fit's sums over experts (backbone refits), which
:func:`chunked_sum` accumulates chunk by chunk once the whole batched temporary would pass the budget.
"""

from __future__ import annotations

import os

import torch

__all__ = ["CHUNK_ALIGN", "CHUNK_BYTES", "chunk_budget", "expert_chunks", "factor_bytes_per_expert", "chunked_sum"]

# bytes of the largest per-expert temporary times the experts of a chunk; MOBIE_CHUNK_BYTES overrides
CHUNK_BYTES = 256 * 2**20
# experts per chunk are a multiple of this (fp32 matrices keep their address modulo 64 bytes)
CHUNK_ALIGN = 16
# ... unless 16 experts' temporaries pass the budget by more than this factor: then one expert per chunk
UNALIGNED_ABOVE = 4


def chunk_budget() -> int:
    env = os.environ.get("MOBIE_CHUNK_BYTES")
    return int(env) if env else CHUNK_BYTES


def factor_bytes_per_expert(m: int, n: int, planes: int = 1, left_metric: bool = True) -> int:
    """fp32 bytes of the largest temporaries of one expert's factor problem: the stacked right metric
    ``[(1+P)·n]²`` (and the scale-refit system of the same size), the row-scale system ``[m, m]`` under a
    left metric, and a few ``[m, (1+P)·n]`` factors."""
    cols = planes * n
    return 4 * (2 * cols * cols + (m * m if left_metric else 0) + 4 * m * cols)


def expert_chunks(E: int, per_expert: int, budget: int | None = None, parts: int = 1) -> list[slice]:
    """Slices of ``range(E)`` of a multiple of :data:`CHUNK_ALIGN` experts each (the last one: the rest), as
    many as keep ``len(slice) * per_expert <= budget``, at least ``CHUNK_ALIGN`` (single experts when that
    floor passes the budget more than :data:`UNALIGNED_ABOVE` times); with ``parts`` > 1 (workers)
    also at most ``ceil(E / parts)`` experts rounded up to the alignment, so each part gets a chunk."""
    budget = chunk_budget() if budget is None else budget
    size = budget // max(per_expert, 1)
    if size >= CHUNK_ALIGN:
        size = size // CHUNK_ALIGN * CHUNK_ALIGN
    elif per_expert * CHUNK_ALIGN > UNALIGNED_ABOVE * budget:
        # experts so large that 16 of them pass the budget many times over (Qwen3-30B-A3B's width: ~0.24 GB
        # each, so a 16-expert chunk held ~4 GB per temporary): one expert at a time. Deterministic, and the
        # same with any number of workers, but not bit for bit the batched result (alignment, above)
        return [slice(s, s + 1) for s in range(E)]
    else:
        size = CHUNK_ALIGN
    if parts > 1:
        share = -(-E // parts)
        size = min(size, -(-share // CHUNK_ALIGN) * CHUNK_ALIGN)
    return [slice(s, min(E, s + size)) for s in range(0, E, size)]


def chunked_sum(fn, E: int, per_expert: int, budget: int | None = None) -> torch.Tensor:
    """``fn(slice(0, E)).sum(0)`` when the batched temporary ``E·per_expert`` bytes fits the budget (the
    exact historical result), else the sum of ``fn(chunk).sum(0)`` over expert chunks (bounded memory;
    float summation order differs in the last bits)."""
    budget = chunk_budget() if budget is None else budget
    if E * per_expert <= budget:
        return fn(slice(0, E)).sum(0)
    total = None
    for sl in expert_chunks(E, per_expert, budget):
        part = fn(sl).sum(0)
        total = part if total is None else total + part
    return total
