"""Input second moments ``H = Σ_i w_i x_i x_iᵀ`` accumulated in fp32, one matmul per batch.

Every Hessian in this package is a sum of outer products of layer inputs; :func:`add_outer` is the only
place where rows meet. Row weights ``w_i`` default to 1: that is the extension point for gradient
statistics (GLAS: ``w_i`` = squared output gradients of row ``i``, folded into the Hessian), so a
gradient-aware collector reuses these accumulators unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "add_outer", "check_finite_activations", "joint_expert_metric"]


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


def joint_expert_metric(H: torch.Tensor, counts: torch.Tensor | None, *, guided: torch.Tensor | None = None,
                        glas_lambda: float = 0.0, rank_damp: float = 0.0, fallback_experts=()) -> torch.Tensor:
    """The per-expert Hessians of one joint objective over the experts of a projection.

    ``H [E, in, in]`` mean Hessians become sums (``counts`` routed tokens, None = equal usage), so an
    expert weighs by its share of the calibration tokens; the whole is trace-normalized and mixed with the
    trace-normalized gradient-weighted sums ``guided`` (GLAS) at ``glas_lambda``. Experts routed fewer
    tokens than inputs (singular ``H_e``, fallbacks excepted) get a ridge of ``rank_damp`` of their mean
    diagonal, and experts with almost no mass a floor, so every expert's problem stays well posed.
    """
    H = H.float()
    E, n = H.shape[0], H.shape[-1]
    w = torch.ones(E) if counts is None else counts.float().cpu()
    if counts is not None:
        w = w.clamp_min(max(1e-2 * float(w.mean()), 1.0))
    Hs = H * w.to(H.device)[:, None, None]
    Hs = Hs / Hs.diagonal(dim1=-2, dim2=-1).sum().clamp_min(1e-30)
    if guided is not None and glas_lambda > 0:
        Hg = guided.float().to(H.device)
        Hg = Hg / Hg.diagonal(dim1=-2, dim2=-1).sum().clamp_min(1e-30)
        Hs = (1 - glas_lambda) * Hs + glas_lambda * Hg
    eye = torch.eye(n, dtype=Hs.dtype, device=Hs.device)
    if rank_damp > 0 and counts is not None:
        singular = (counts < n).to(Hs.device)  # rank(H_e) <= routed tokens: a ridge bounds the fits
        singular[[e for e in fallback_experts if e < E]] = False
        md = Hs[singular].diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        Hs[singular] += rank_damp * md * eye
    tr = Hs.diagonal(dim1=-2, dim2=-1).mean(-1)
    floor = 1e-3 * tr.mean()
    low = tr < floor
    if bool(low.any()):
        Hs[low] = Hs[low] + floor * H[low] / H[low].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    return Hs
