"""Random parts of packed MoBiE weights shared by the kernel tests (not a test module)."""

from __future__ import annotations

import torch


def random_backbone(side: str, m: int, n: int, blocks: int, bb_dtype: torch.dtype) -> dict:
    """A block-diagonal backbone on ``side`` ("input": ``n``, "output": ``m``) of ``blocks`` random blocks, as
    ``MoBiETensor.from_parts`` takes it: int8 blocks with fp16 per-row scales, or blocks in ``bb_dtype``."""
    N = m if side == "output" else n
    kb = N // blocks
    blk = torch.randn(blocks, kb, kb) / kb ** 0.5
    if bb_dtype == torch.int8:
        scale = blk.abs().amax(-1) / 127
        q = torch.round(blk / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return {"blocks": q, "scale": scale.to(torch.float16)}
    return {"blocks": blk.to(bb_dtype)}
