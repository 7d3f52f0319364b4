"""Router re-alignment: expert-shift suppression on the router's side.

NGES keeps the binarization error out of the directions the later routers read, but most of the shift a
router sees is the overall error of every binarized layer before it, which reaches its input through the
residual stream, attention and the norm. The routers stay in full precision, so they can absorb the
systematic part of that shift at no storage cost: each MoE router's weight ``W [E, H]`` is refit by ridge
least squares so that its logits on the *quantized* model's router inputs ``X_q`` match the full-precision
model's logits on the same calibration tokens::

    W' = argmin ||X_q W'ᵀ − X_fp Wᵀ||² + λ·mean(diag X_qᵀX_q)·||W' − W||²

The full-precision logits are recorded during the calibration capture forward (``[tokens, E]`` per MoE
layer, far smaller than the hidden states), and ``X_q`` comes from running the layer up to its router on
the sequential pass's inputs. A router with nothing binarized before it is left as it is.
Measured (3 seeds, ``benchmarks/results/router_align.md``): top-k agreement +0.0012 to +0.0046 on the four
zoo and six core held-out models, the gap level or lower except on olmoe-32e (0.0212 → 0.0223), which
keeps it off by default; λ from 0.001 to 0.1 moved top-k by at most 0.0004 (qwen3moe-32e, seed 0).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterAlignment", "RouterTargets", "align_router"]


def _router_logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``router`` for inputs ``x`` (flattened to ``[tokens, H]``), in fp32 without its bias."""
    return F.linear(x.reshape(-1, x.shape[-1]).float(), router.weight.float())


class RouterTargets:
    """Context manager: while it is open, every MoE router of ``layout`` records its full-precision logits
    ``[tokens, E]`` per forward call (one call per calibration batch), by layer index. ``layout=None``:
    records nothing (router alignment off)."""

    def __init__(self, layout):
        self.layout = layout
        self.logits: dict[int, list[torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "RouterTargets":
        for layer in self.layout.layers if self.layout is not None else ():
            router = None if layer.moe is None else layer.moe.router
            if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
                continue
            store = self.logits.setdefault(layer.index, [])
            self._handles.append(router.register_forward_pre_hook(
                lambda m, args, kwargs, store=store: store.append(_router_logits(m, _input(args, kwargs)).detach()),
                with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _input(args, kwargs) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


class _Stop(Exception):
    """Raised by the router's pre-hook: the rest of the layer is not needed."""


class RouterAlignment(NamedTuple):
    """Mean squared logit error of one router against the full-precision logits (calibration tokens) before
    and after the refit, and whether the refit was kept (the held-back LM loss did not rise)."""

    before: float
    after: float
    kept: bool


@torch.no_grad()
def align_router(layer, hidden, calls, batches, targets: list[torch.Tensor], ridge: float = 0.01,
                 judge: Callable[[], torch.Tensor] | None = None, first_layer: Callable = nullcontext) -> RouterAlignment:
    """Refit ``layer``'s router (a :class:`~..integrations.transformers.DecoderLayerInfo` with an MoE block)
    on the calibration batches that are not held back, from its current inputs ``hidden`` and the
    full-precision ``targets`` (one ``[tokens, E]`` per batch, :class:`RouterTargets`). Padded tokens are
    left out. A router whose logits are still the full-precision ones, bit for bit, is left as it is.
    ``judge``: per-sequence LM loss of the held-back calibration sequences with the current weights
    (:meth:`~.heldback.HeldbackLoss.per_sequence`); the refit is kept only when it lowers their mean.
    ``first_layer(batch indices)``: a context for the layer's runs on those batches (the pipeline replays the
    attention its gate_up stage recorded, so the run up to the router is the norm alone)."""
    router = layer.moe.router
    W = router.weight.detach().double()
    H = W.shape[1]
    A = torch.zeros(H, H, dtype=torch.float64, device=W.device)
    C = torch.zeros(H, W.shape[0], dtype=torch.float64, device=W.device)
    seen: list[torch.Tensor] = []

    def stop(module, args, kwargs):
        seen.append(_input(args, kwargs).detach())
        raise _Stop

    handle = router.register_forward_pre_hook(stop, with_kwargs=True)
    yy, n, same = 0.0, 0, True
    try:
        with first_layer([i for i, b in enumerate(batches) if not b.heldback]):
            for h, (args, kwargs), b, y in zip(hidden, calls, batches, targets):
                if b.heldback:  # kept out of sample for the held-back judge of later layers
                    continue
                seen.clear()
                try:
                    layer.module(h, *args, **kwargs)
                except _Stop:
                    pass
                if not seen:
                    raise RuntimeError(f"{layer.fqn}: its router ({type(router).__name__}) was not called; "
                                       "cannot align it")
                same &= torch.equal(_router_logits(router, seen[0]), y)
                x = seen[0].reshape(-1, H).double()
                yd = y.double()
                if b.token_mask is not None:
                    keep = b.token_mask.to(x.device)
                    x, yd = x[keep], yd[keep]
                yd = yd.to(x.device)
                A += x.T @ x
                C += x.T @ yd
                yy += float((yd * yd).sum())
                n += yd.numel()
    finally:
        handle.remove()
    if not n or same:  # nothing binarized before this router reaches it: it is aligned already
        return RouterAlignment(0.0, 0.0, False)
    lam = ridge * float(A.diagonal().mean())
    eye = torch.eye(H, dtype=A.dtype, device=A.device)
    Wn = torch.linalg.solve(A + lam * eye, C + lam * W.T).T

    def err(V):  # ||X Vᵀ − Y||² from the Gram sums
        return max(0.0, float((V @ A * V).sum() - 2 * (V * C.T).sum()) + yy) / n

    before, after = err(W), err(Wn)
    base = None if judge is None else judge()
    saved = router.weight.detach().clone()
    router.weight.copy_(Wn.to(router.weight.dtype))
    if base is not None and not float((judge() - base).mean()) < 0:
        router.weight.copy_(saved)
        return RouterAlignment(before, after, False)
    return RouterAlignment(before, after, True)
