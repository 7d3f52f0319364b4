"""Workers: one quantization spread over the ranks of a ``torch.distributed`` process group.

Launched with ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on CUDA), every rank runs the same program
on the same calibration data, and two steps are split by experts:

* statistics: each rank accumulates the per-expert Hessians of its own block of experts only
  (:func:`owned_experts`); the sums are then all-reduced, and since every other rank holds exact zeros
  there, each expert's Hessian is bit-identical to the single-process one;
* binarization: CEJD's per-expert steps already run on expert chunks that start at multiples of 16 experts
  (:mod:`torchao_mobie.algorithms.chunks`, which keeps them bit-identical to one batch); with N ranks the
  chunks are at most ``ceil(E / N)`` experts (still 16-aligned), each rank fits its share, and
  :func:`map_chunks` gathers the per-expert states in chunk order.

Everything else (the forward passes, GLAS, the held-back judge, backbone refits, the planner) runs on every
rank on identical values, so all ranks hold the same result; only rank 0 writes files (:func:`is_writer`).
A layer with fewer than 32 experts is one chunk, so its binarization is not split. Without an initialized
process group (or with one rank) every function here is the single-process identity.
"""

from __future__ import annotations

import os

import torch

__all__ = ["barrier", "init_from_env", "is_writer", "map_chunks", "owned_experts", "rank", "reduce_sum", "world_size"]


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if not _group_active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    if not _group_active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def is_writer() -> bool:
    """Whether this process writes output files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: str | None = None) -> int:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): NCCL when
    ``device`` is CUDA, else gloo. Returns the world size (1 when not launched by torchrun)."""
    import torch.distributed as dist

    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return 1
    if dist.is_initialized():
        return dist.get_world_size()
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_world_size()


def barrier() -> None:
    if _group_active():
        import torch.distributed as dist

        dist.barrier()


def owned_experts(num_experts: int) -> range:
    """The block of experts whose statistics this rank accumulates."""
    n, r = world_size(), rank()
    return range(num_experts * r // n, num_experts * (r + 1) // n)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (each expert's rows are non-zero on one rank only: exact)."""
    if _group_active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def map_chunks(fn, chunks: list) -> list:
    """``[fn(c) for c in chunks]``, chunk ``i`` computed by rank ``i % N`` and the results gathered by all."""
    n = world_size()
    if n == 1 or len(chunks) == 1:
        return [fn(c) for c in chunks]
    import torch.distributed as dist

    r = rank()
    mine = {i: fn(c) for i, c in enumerate(chunks) if i % n == r}
    gathered: list = [None] * n
    dist.all_gather_object(gathered, mine)
    out = {}
    for part in gathered:
        out.update(part)
    return [out[i] for i in range(len(chunks))]
