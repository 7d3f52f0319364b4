"""CEJD's backbone refits for many experts, with no per-expert ``[k, k]`` temporary held for all experts.

The refits of :mod:`.cejd_backbone` are sums over experts. Their batched form builds one ``[k, k]`` term
per expert and then sums: ``W_e H_e Q_eᵀ`` (output side, ``k = m``) or the Gram ``K_e = Q_eᵀ G Q_e`` and the
operator products ``K_e X H_e`` (input side, ``k = n``), in float64. At 512 experts of width 512 that is
1-4 GB per term. Here the sums are accumulated over expert chunks (:mod:`.chunks`) and contracted without
the per-expert terms where the factors are thinner than the terms:

* output side: ``Σ_e (W_e H_e) Q_eᵀ`` as one ``[m, c·n] @ [c·n, m]`` product per chunk;
* input side with ``m < n`` (the Gram has rank ``m``): ``Σ_e K_e X H_e = Σ_e Q_eᵀ (G Q_e X H_e)`` costs
  ``3·m·n²`` per expert instead of ``2·n³``, and the Kronecker preconditioner's statistics use
  ``⟨K_e, K̄⟩ = Σ (G Q_e) ∘ (Q_e K̄)``; with ``m ≥ n`` the Grams ``[E, n, n]`` (no larger than the weights)
  are kept in fp32.

:func:`~.cejd_backbone.refit_backbone` uses these only when the batched temporaries would pass the chunk
budget, so results below it (the whole zoo) are the historical ones bit for bit; above it they agree to
float64/float32 summation order.
"""

from __future__ import annotations

import torch

from .chunks import expert_chunks

__all__ = ["output_side_sums", "InputSideSystem"]


def output_side_sums(W, H, Q, s0: int, s1: int, budget: int | None = None):
    """``(Σ_e W_e H_e Q_eᵀ, Σ_e Q_e H_e Q_eᵀ)`` over rows ``s0:s1`` of the output side, float64."""
    E, _, n = W.shape
    mb = s1 - s0
    num = torch.zeros(mb, mb, dtype=torch.float64)
    den = torch.zeros(mb, mb, dtype=torch.float64)
    for c in expert_chunks(E, 8 * (n * n + 3 * mb * n), budget):
        Hc = H[c].double()
        Qb = Q[c, s0:s1].double()
        ce = Qb.shape[0]
        Qs = Qb.transpose(0, 1).reshape(mb, ce * n)  # [mb, c·n]: the experts side by side
        num += (W[c, s0:s1].double() @ Hc).transpose(0, 1).reshape(mb, ce * n) @ Qs.t()
        den += (Qb @ Hc).transpose(0, 1).reshape(mb, ce * n) @ Qs.t()
    return num, den


class InputSideSystem:
    """The input-side normal equations ``Σ_e K_e S H_e = Σ_e Q_eᵀ G W_e H_e``, ``K_e = Q_eᵀ G Q_e``, by chunks.

    ``apply(X)`` is the operator in fp32 products (as the batched refit), everything else float64."""

    def __init__(self, W, H, Q, G=None, budget: int | None = None):
        E, m, n = W.shape
        self.H, self.E, self.n = H, E, n
        self.lowrank = m < n
        self.Q = Q.float()
        self.GQ = self.Q if G is None else G.float() @ self.Q
        self.chunks = expert_chunks(E, 8 * (2 * n * n + 3 * m * n), budget)
        self.K = None
        if not self.lowrank:  # [E, n, n] fp32 Grams, no larger than the factors
            self.K = torch.empty(E, n, n)
            for c in self.chunks:
                self.K[c] = self.Q[c].transpose(-1, -2) @ self.GQ[c]
        rhs = torch.zeros(n, n, dtype=torch.float64)
        trK = torch.empty(E, dtype=torch.float64)
        for c in self.chunks:
            GQ = self.GQ[c].double()
            rhs += _stacked_t(GQ, W[c].double() @ H[c].double())
            trK[c] = (self.Q[c].double() * GQ).sum((-2, -1))
        self.rhs, self.trK = rhs, trK
        self.trH = H.diagonal(dim1=-2, dim2=-1).double().sum(-1)

    def apply(self, X):
        """``Σ_e K_e X H_e`` (fp32 products, float64 sum)."""
        X32 = X.float()
        out = torch.zeros(self.n, self.n, dtype=torch.float64)
        for c in self.chunks:
            if self.lowrank:
                out += _stacked_t(self.Q[c], self.GQ[c] @ X32 @ self.H[c]).double()
            else:
                out += (self.K[c] @ X32 @ self.H[c]).sum(0).double()
        return out

    def _h_inner(self, Hb):
        return torch.cat([(self.H[c].double() * Hb).sum((-2, -1)) for c in self.chunks])

    def _k_weighted(self, w):
        out = torch.zeros(self.n, self.n, dtype=torch.float64)
        for c in self.chunks:
            if self.lowrank:
                out += _stacked_t(self.Q[c].double() * w[c, None, None], self.GQ[c].double())
            else:
                out += (self.K[c].double() * w[c, None, None]).sum(0)
        return out

    def _k_inner(self, Kb):
        if self.lowrank:
            return torch.cat([(self.GQ[c].double() * (self.Q[c].double() @ Kb)).sum((-2, -1)) for c in self.chunks])
        return torch.cat([(self.K[c].double() * Kb).sum((-2, -1)) for c in self.chunks])

    def kronecker_factors(self):
        """``(K̄, H̄)`` of the nearest Kronecker product ``K̄ ⊗ H̄ ≈ Σ_e K_e ⊗ H_e`` (as
        :func:`~.cejd_backbone._kronecker_preconditioner`)."""
        Hb = torch.zeros(self.n, self.n, dtype=torch.float64)
        for c in self.chunks:
            Hb += self.H[c].double().sum(0)
        Hb /= self.E
        for _ in range(3):
            w = self._h_inner(Hb) / (Hb * Hb).sum().clamp_min(1e-300)
            Kb = self._k_weighted(w)
            v = self._k_inner(Kb) / (Kb * Kb).sum().clamp_min(1e-300)
            Hb = torch.zeros_like(Hb)
            for c in self.chunks:
                Hb += (self.H[c].double() * v[c, None, None]).sum(0)
        return Kb, Hb


def _stacked_t(A, B):
    """``Σ_e A_eᵀ B_e`` for ``A, B [c, m, n]``: one ``[n, c·m] @ [c·m, n]`` product."""
    c, m, n = A.shape
    return A.reshape(c * m, n).t() @ B.reshape(c * m, n)
