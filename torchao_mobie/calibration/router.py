"""Statistics of the hidden states entering an MoE router, kept for expert-shift work (NGES).

In every supported family the router and the experts module receive the same ``[T, H]`` tensor (the
post-attention-norm hidden states), so these moments are accumulated by the experts collector from
the experts-module input; the same sums also serve as the layer-level Hessian for starved experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RouterInputStats"]


@dataclass
class RouterInputStats:
    """Moments of the router input over the calibration tokens of one MoE layer.

    mean: ``[H]`` fp32, ``E[x]``.
    second_moment: ``[H, H]`` fp32, ``E[x xᵀ]`` (uncentered; the covariance is
        ``second_moment - mean meanᵀ``).
    count: number of tokens.
    """

    mean: torch.Tensor
    second_moment: torch.Tensor
    count: int

    @classmethod
    def from_sums(cls, sum_x: torch.Tensor, sum_xxt: torch.Tensor, count: int) -> "RouterInputStats":
        n = max(int(count), 1)
        return cls(mean=sum_x / n, second_moment=sum_xxt / n, count=int(count))

    def covariance(self) -> torch.Tensor:
        return self.second_moment - torch.outer(self.mean, self.mean)

    def to(self, device) -> "RouterInputStats":
        return RouterInputStats(self.mean.to(device), self.second_moment.to(device), self.count)
