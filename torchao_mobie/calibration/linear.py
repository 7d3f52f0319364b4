"""Input Hessians of ``nn.Linear`` layers in scope (attention projections, shared experts, dense MLPs)."""

from __future__ import annotations

import torch
from torch import nn

from .hessian import HessianAccumulator, check_finite_activations

__all__ = ["LinearStatsCollector"]


class LinearStatsCollector:
    """``Σ x xᵀ`` (fp32) of the inputs of one ``nn.Linear``, via a forward pre-hook.

    token_mask: optional ``[T]`` bool (False = padding) matched against the flattened leading dims of
    the input when their count agrees; set by the caller before each batch.
    """

    def __init__(self, module: nn.Linear, fqn: str = ""):
        self.module = module
        self.fqn = fqn
        self.hessian = HessianAccumulator(module.in_features, device=module.weight.device)
        self.token_mask: torch.Tensor | None = None
        self._handle = None

    @property
    def count(self) -> int:
        return self.hessian.count

    def attach(self) -> "LinearStatsCollector":
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args):
        self.observe(args[0])
        return None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, *, row_weights: torch.Tensor | None = None) -> None:
        """Add the rows of ``x [..., in]``; ``row_weights`` is the GLAS extension point."""
        x = x.reshape(-1, self.hessian.dim).to(device=self.hessian.sum.device, dtype=torch.float32)
        check_finite_activations(x, self.fqn or "linear layer")
        mask = self.token_mask
        if mask is not None and mask.numel() == x.shape[0]:
            keep = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            x = x[keep]
            row_weights = None if row_weights is None else row_weights.reshape(-1)[keep]
        self.hessian.add(x, row_weights)

    def finalize(self) -> torch.Tensor:
        """Mean Hessian ``[in, in]``; raises if nothing was observed."""
        if self.hessian.count == 0:
            raise RuntimeError(
                f"{self.fqn or 'linear layer'}: no inputs were observed; run calibration batches through the "
                "model between the 'observe' and 'convert' steps")
        return self.hessian.mean()
