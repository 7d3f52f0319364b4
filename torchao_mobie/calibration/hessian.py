"""Input second moments ``H = Σ_i w_i x_i x_iᵀ`` accumulated in fp32, one matmul per batch.

Every Hessian in this package is a sum of outer products of layer inputs; :func:`add_outer` is the only
place where rows meet. Row weights ``w_i`` default to 1: that is the extension point for gradient
statistics (GLAS: ``w_i`` = squared output gradients of row ``i``, folded into the Hessian), so a
gradient-aware collector reuses these accumulators unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "add_outer", "check_finite_activations"]


def check_finite_activations(x: torch.Tensor, where: str) -> None:
    """NaN/Inf inputs would poison every Hessian they touch (and then every scale): name the layer."""
    if not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"{where}: {n} non-finite calibration activations (NaN/Inf) in its input; check the calibration token "
            "ids and the weights of the layers before it (in half precision: an overflow, try float32)")


def add_outer(acc: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """``acc += xᵀ diag(weights) x`` in place, for ``x [n, d]`` (cast to ``acc``'s dtype)."""
    if x.shape[0] == 0:
        return
    x = x.to(acc.dtype)
    xw = x if weights is None else x * weights.to(acc.dtype).unsqueeze(-1)
    acc.addmm_(xw.t(), x)


class HessianAccumulator:
    """Running ``Σ x xᵀ`` (fp32) and row count of the inputs of one ``[out, in]`` weight."""

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.count = 0

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add rows ``x [..., dim]`` (leading dims flattened), optionally weighted per row."""
        x = x.reshape(-1, self.dim)
        add_outer(self.sum, x, None if weights is None else weights.reshape(-1))
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        """``Σ x xᵀ / n`` (a new tensor). Raises if no row was seen."""
        if self.count == 0:
            raise ValueError("HessianAccumulator.mean(): no inputs were observed")
        return self.sum / self.count
