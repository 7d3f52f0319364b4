"""Layer-wise GLAS without its recompute: the calibration capture forward keeps every layer's graph.

Layer-wise GLAS (:mod:`.glas_layerwise`) recomputes each decoder layer from its stored input to backpropagate
through it: one more forward of the whole model (on olmoe-32e about 5% of quantization time). When the graphs
of every layer and batch fit the activation budget (counted exactly, as the tensors autograd saves), the
capture forward builds them instead, cut at the layer boundaries (each layer's input a fresh leaf, parameters
frozen), and GLAS backpropagates through the kept graphs. The same operations on the same values, so the same
pair weights, bit for bit; past the budget nothing is kept and GLAS recomputes as before.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from .glas_layerwise import _out
from .gradients import saved_call

__all__ = ["KeptGraphs"]


class KeptGraphs:
    """Context manager around the capture forward of ``model``: for its leading ``n`` batches, per layer
    ``i`` and batch ``b``, the input leaf ``leaves[i][b]``, the output with its graph ``roots[i][b]`` and the
    experts call ``calls[i][b]`` (:func:`~.gradients.saved_call`; None without experts). ``complete`` is
    False when the graphs outgrew ``budget`` bytes (then none is kept)."""

    def __init__(self, model: nn.Module, layout, n: int, budget: int):
        self.model, self.layout, self.n, self.budget = model, layout, n, budget
        L = len(layout.layers)
        self.leaves = [[] for _ in range(L)]
        self.roots = [[] for _ in range(L)]
        self.calls = [[] for _ in range(L)]
        self.bytes = 0
        self.complete = False
        self._batch = -1
        self._stack = ExitStack()

    def _keeping(self) -> bool:
        return 0 <= self._batch < self.n and self.bytes <= self.budget

    def __enter__(self) -> "KeptGraphs":
        layers = self.layout.layers
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        handles = []

        def pre(i):
            def hook(module, args, kwargs):
                if i == 0:
                    self._batch += 1
                if not self._keeping():
                    return None
                hs = args[0] if args else kwargs["hidden_states"]
                if i > 0:
                    self.roots[i - 1].append(hs)
                leaf = hs.detach().requires_grad_(True)
                self.leaves[i].append(leaf)
                return ((leaf, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": leaf})
            return hook

        def experts_hook(i, info):
            def hook(module, args, kwargs, output):
                if self._keeping():
                    self.calls[i].append(saved_call(info, args, kwargs, output))
            return hook

        def last(module, args, output):
            if self._keeping():
                self.roots[-1].append(_out(output))

        def pack(t):
            if self._keeping():
                self.bytes += t.numel() * t.element_size()
            return t

        for i, layer in enumerate(layers):
            handles.append(layer.module.register_forward_pre_hook(pre(i), with_kwargs=True))
            if layer.moe is not None:
                info = layer.moe.experts
                handles.append(info.module.register_forward_hook(experts_hook(i, info), with_kwargs=True))
        handles.append(layers[-1].module.register_forward_hook(last))
        for h in handles:
            self._stack.callback(h.remove)
        self._stack.enter_context(torch.enable_grad())
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        for p, f in self._flags:
            p.requires_grad_(f)
        L = len(self.layout.layers)
        n = min(self.n, self._batch + 1)
        self.complete = exc[0] is None and self.bytes <= self.budget and all(
            len(self.leaves[i]) == n and len(self.roots[i]) == n for i in range(L)) and all(
            len(self.calls[i]) == n for i, layer in enumerate(self.layout.layers) if layer.moe is not None)
        if not self.complete:
            self.drop()

    def drop(self) -> None:
        for lists in (self.leaves, self.roots, self.calls):
            for x in lists:
                x.clear()
