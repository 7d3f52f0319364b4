"""What every binarization algorithm returns: the weight it stands for and what storing it costs.

Bit accounting has two conventions because the papers and the hardware disagree: the papers count
sign planes and bitmaps only (~1.1 bits for BiLLM), while memory holds every scale, mean and backbone
value too. Every reported figure names its convention.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class BitBudget:
    """Storage of one or more binarized matrices, counted in bits.

    n_weights: quantized weights covered (out*in per matrix).
    sign_bits: 1 per weight per binary plane (salient columns with two planes count twice).
    bitmap_bits: bitmaps the papers count (BiLLM/ARB: the salient-column bitmap, 1 bit per column
        per block).
    group_bitmap_bits: per-weight group bitmaps the papers leave out (which split group a weight
        belongs to: 1 bit per non-salient weight, and per salient weight too under ARB's CGB).
    param_bits: every high-precision statistic (scales, means, column scales), at its stored width.
    backbone_bits: shared high-precision matrices (CEJD backbone), at their stored width.
    """

    n_weights: int = 0
    sign_bits: int = 0
    bitmap_bits: int = 0
    group_bitmap_bits: int = 0
    param_bits: int = 0
    backbone_bits: int = 0

    def __add__(self, other: "BitBudget") -> "BitBudget":
        return BitBudget(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def paper_bits(self) -> float:
        """Papers' convention: sign planes + bitmaps per weight (scales and backbone not counted)."""
        return (self.sign_bits + self.bitmap_bits) / max(1, self.n_weights)

    @property
    def stored_bits(self) -> int:
        """Every stored bit: planes, all bitmaps, scales/means, shared backbone."""
        return self.sign_bits + self.bitmap_bits + self.group_bitmap_bits + self.param_bits + self.backbone_bits

    @property
    def all_inclusive_bits(self) -> float:
        """Every stored bit per weight: planes, all bitmaps, scales/means, shared backbone."""
        return self.stored_bits / max(1, self.n_weights)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(paper_bits=round(self.paper_bits, 4), all_inclusive_bits=round(self.all_inclusive_bits, 4))
        return d


@dataclass
class BinarizedWeight:
    """A binarized ``[out, in]`` matrix: its dequantized value (fp32) and its storage cost.

    ``factors`` keeps the stored form (:class:`~torchao_mobie.algorithms.factors.CEJDFactors`, with an
    expert dim of 1) when the method has a packed format (MoBiE); fake-quant methods leave it None.
    """

    weight: torch.Tensor
    bits: BitBudget
    factors: object | None = None
