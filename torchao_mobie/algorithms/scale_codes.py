"""Log-uniform 8-bit codes for the binary factors' row and column scales.

Why: at fine-grained expert sizes the fp16 row and column scales are 0.22-0.35 of the ~1.5 bits per
weight (``16·(m+n)/(m·n)``). The scales of one expert span a narrow range (measured on the zoo: max/min
3-240x), so a per-expert grid uniform in log2 with 254 steps rounds each scale by < 0.5% relative; on
captured zoo layers the layer objective moves by < 0.06%. Halving their width frees ~0.1-0.17 bits
per weight, which the bit planner spends on salient second planes (worth ~10% of the gap on
qwen3moe-32e).

Code 0 is an exact zero (unused second-plane slots); codes 1..255 are ``2^(lo + (c-1)·step)`` with
``lo`` and ``step`` stored per expert in fp16. Decoding is one exp2 per scale (vectors, never per
weight), so the packed GEMMs take the decoded fp16 vectors exactly as before.
"""

from __future__ import annotations

import torch

__all__ = ["encode_log8", "decode_log8", "CODE_BITS", "GRID_FP16_PER_EXPERT"]

CODE_BITS = 8
GRID_FP16_PER_EXPERT = 6  # (lo, step) for the row, column and second-plane column scales
_LEVELS = 254  # codes 1..255
_MIN_STEP = 2.0 ** -14


def encode_log8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v [..., k]`` non-negative scales -> (codes ``[..., k]`` uint8, grid ``[..., 2]`` fp16 (lo, step))."""
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise ValueError("encode_log8: scales must be finite and non-negative")
    v = v.float()
    pos = v > 0
    lv = torch.where(pos, v.clamp_min(1e-38).log2(), torch.zeros_like(v))
    hi = torch.where(pos, lv, torch.full_like(v, -float("inf"))).amax(-1, keepdim=True)
    lo = torch.where(pos, lv, torch.full_like(v, float("inf"))).amin(-1, keepdim=True)
    none = ~pos.any(-1, keepdim=True)
    lo = torch.where(none, torch.zeros_like(lo), lo).half().float()
    hi = torch.where(none, lo, hi)
    step = ((hi - lo) / _LEVELS).clamp_min(_MIN_STEP).half().float()
    c = torch.clamp(torch.round((lv - lo) / step), 0, _LEVELS) + 1
    codes = torch.where(pos, c, torch.zeros_like(c)).to(torch.uint8)
    return codes, torch.cat([lo, step], -1).half()


def decode_log8(codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """fp16 scales ``[..., k]`` from ``codes [..., k]`` uint8 and ``grid [..., 2]`` fp16."""
    lo = grid[..., 0:1].float()
    step = grid[..., 1:2].float()
    c = codes.to(torch.float32)
    val = torch.exp2(lo + (c - 1) * step)
    return torch.where(codes == 0, torch.zeros_like(val), val).half()
