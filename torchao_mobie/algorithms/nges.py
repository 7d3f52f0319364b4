"""NGES: null-space guided expert-shift suppression (MoBiE §4.3, reconstructed; design doc §4).

The output error of a layer's ``down_proj`` lands in the residual stream that the routers of the
following layers read after their RMSNorm (weight γ): logits ``W_r·diag(γ)·h/rms(h)``. Top-k choices
only depend on logit *differences*, so an error ``δ`` moves routing only through
``C·W_r·diag(γ)·δ`` with ``C = I − 11ᵀ/E`` (centering); every direction orthogonal to the row space
of ``C·W_r·diag(γ)`` (rank ≤ E−1) is in the routers' null space.

:func:`router_metric` builds the output-side metric ``G = I + μ·P`` with ``P`` the (decay-weighted)
average of the projectors onto those routing-sensitive row spaces of the later routers. CEJD then fits
the per-expert scales and the backbone to ``tr(G ΔW H ΔWᵀ)`` instead of ``tr(ΔW H ΔWᵀ)``: the error is
pushed into the routers' null space using only values that are stored anyway (no extra storage).
"""

from __future__ import annotations

import torch

__all__ = ["routing_projector", "router_metric", "router_component"]


def routing_projector(router_weight: torch.Tensor, rtol: float = 1e-6, centered: bool = True) -> torch.Tensor:
    """Orthogonal projector ``[H, H]`` onto the row space of the centered router ``(I − 11ᵀ/E)·W_r``, or of
    ``W_r`` itself when ``centered`` is False: a sigmoid router (DeepSeek-V3) scores each expert on its own
    and adds a per-expert bias before its top-k, so a shift common to all logits can change the choice."""
    R = router_weight.double()
    if centered:
        R = R - R.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(R, full_matrices=False)
    keep = S > rtol * S.max().clamp_min(1e-30)
    V = Vh[keep]
    return (V.t() @ V).float()


def router_metric(routers, mu: float = 1.0, decay: float = 0.5) -> torch.Tensor | None:
    """``G = I + μ·Σ_d decay^d P_d / Σ_d decay^d`` over ``routers`` = [(W_r·diag(γ) [E, H], centered), ...]
    (nearest first; ``centered``: softmax routing, where only logit differences matter, see
    :func:`routing_projector`; None counts as True). None when there is no later router."""
    mats = [r if isinstance(r, (tuple, list)) else (r, True) for r in routers]
    if not mats:
        return None
    H = mats[0][0].shape[1]
    P = torch.zeros(H, H)
    tot = 0.0
    for d, (R, centered) in enumerate(mats):
        w = decay ** d
        if w <= 0:
            break
        P += w * routing_projector(R, centered=centered is not False)
        tot += w
    return torch.eye(H) + mu * P / tot


def router_component(delta: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Squared norm of the routing-sensitive part ``‖P δ‖²`` of output errors ``delta [..., H]``."""
    P = routing_projector(router_weight)
    return (delta @ P).pow(2).sum()
