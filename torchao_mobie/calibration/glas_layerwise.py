"""Layer-wise GLAS: the loss gradients at every expert output with one decoder layer's graph alive at a time.

The whole-model form (:func:`~.gradients.compute_glas_weights`) backpropagates the LM loss through the
model in one graph per calibration batch: every layer's activations are kept until the backward pass
reaches them, and every layer's weights must be in memory. Here (issue 18, checkpointing at layer
boundaries):

1. forward: the decoder-layer boundary activations ``h_0 … h_L`` of every batch are stored (no graph),
   in an :class:`~.activations.ActivationStore` (CPU memory, or disk past its size rule);
2. top: ``∂ℓ/∂h_L`` through the final norm, the LM head and the summed next-token cross entropy;
3. from layer ``L-1`` down to 0: the layer is recomputed from its stored input with autograd on, the
   incoming gradient is backpropagated through it, the layer's GLAS pair weights are taken from the
   gradient at its experts output (:func:`~.gradients.pair_gradient_weights`, the same statistics), and
   ``∂ℓ/∂h_i`` is passed to the layer below.

Cost: one more forward per layer (the recomputation) than the whole-model pass, and in memory the
``L + 1`` boundary activations plus one layer's graph for one batch instead of the whole model's graph.
When every layer's graph fits the activation budget, ``quantize_model`` keeps them from its capture forward
instead (:mod:`.glas_graphs`, :func:`glas_from_graphs`): no recomputation, the same values.
The gradients are the whole-model ones: the same operations on the same values, so on the zoo they agree
bit for bit (the test allows float summation order: ``rtol=1e-5``). ``layers`` is anything with
``open(i)`` (a context manager yielding layer ``i``'s module and its experts, or None): the in-memory
model, or the streaming loader that reads one layer from its shards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .gradients import GLASWeights, collect_pair_weights, deterministic_on_cpu, lm_loss_sum, saved_call

__all__ = ["ModelLayers", "forward_boundaries", "glas_from_graphs", "layerwise_glas_weights", "lm_loss_sum"]


class ModelLayers:
    """The decoder layers of an in-memory model (a :class:`~..integrations.transformers.MoEModelLayout`)."""

    def __init__(self, layout):
        self.layout = layout

    def __len__(self):
        return len(self.layout.layers)

    @contextmanager
    def open(self, i: int):
        layer = self.layout.layers[i]
        yield layer.module, (layer.moe.experts if layer.moe is not None else None)


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@torch.no_grad()
def forward_boundaries(layers, hidden: list, calls, store) -> None:
    """``store[i] = [h_i per batch]`` for ``i = 0 … L`` (``hidden``: the layer-0 inputs; ``calls[i][b]`` the
    ``(args, kwargs)`` layer ``i`` gets for batch ``b``)."""
    h = list(hidden)
    store.put(0, h)
    for i in range(len(layers)):
        with layers.open(i) as (module, _):
            h = [_out(module(x, *args, **kwargs)) for x, (args, kwargs) in zip(h, calls[i])]
        store.put(i + 1, h)


def layerwise_glas_weights(layers, batches, calls, store, head_loss, power: float = 1.0,
                           expert_inputs: dict | None = None) -> GLASWeights:
    """GLAS pair weights of every MoE layer from stored boundaries ``store[0 … L]`` (:func:`forward_boundaries`).

    ``head_loss(h_L, batch)``: the scalar loss from the last layer's output (final norm, LM head,
    :func:`lm_loss_sum`). Returns :class:`~.gradients.GLASWeights` keyed by experts fqn, one entry per batch.
    ``expert_inputs``: when given, also filled with every experts module's full-precision input rows per batch
    (fp32 ``[N, H]``, keyed by fqn): the recomputation has them anyway, and the full-precision target
    (:class:`~.fp_shadow.FPShadow`) would otherwise run each layer once more to get them.
    """
    n_layers = len(layers)
    index, wgu, wdn = {}, {}, {}
    with deterministic_on_cpu(store.get(0)[0].device):
        grads = _head_grads(store.get(n_layers), batches, head_loss)
        for i in reversed(range(n_layers)):
            with layers.open(i) as (module, info):
                grads = _layer_backward(module, info, store.get(i), calls[i], grads, power, index, wgu, wdn,
                                        expert_inputs, input_grads=i > 0)
            store.drop(i + 1)
    return _bottom_up(index, wgu, wdn)


def _head_grads(last, batches, head_loss) -> list:
    """``∂ℓ/∂h_L`` per batch from the last layer's outputs ``last``. The gradient at h only: ``.backward()``
    also formed the final norm's and LM head's (tied: the embedding's) weight gradients, about half this
    step, and left them in ``.grad`` on the user's model."""
    with torch.enable_grad():
        out = []
        for h, b in zip(last, batches):
            h = h.detach().requires_grad_(True)
            out.append(torch.autograd.grad(head_loss(h, b), h)[0])
        return out


def _bottom_up(index, wgu, wdn) -> GLASWeights:
    order = list(index)[::-1]  # collected top-down; bottom-up, as the whole-model pass
    return GLASWeights({f: index[f] for f in order}, {f: wgu[f] for f in order}, {f: wdn[f] for f in order})


def _layer_backward(module, info, inputs, calls, grads, power, index, wgu, wdn, expert_inputs=None,
                    input_grads: bool = True):
    """Recompute one layer per batch from its stored input, backpropagate ``grads``, collect its pair
    weights; returns the gradients at its inputs. ``input_grads=False`` (the bottom layer: nothing below
    takes them): the backward stops at the experts output, and a layer without experts is not recomputed
    at all (on olmoe-32e the bottom layer's experts, router and attention backward were ~10% of GLAS)."""
    if not input_grads and info is None:
        return []
    flags = [(p, p.requires_grad) for p in module.parameters()]
    saved = {}

    def hook(mod, args, kwargs, output):
        saved["call"] = saved_call(info, args, kwargs, output)

    handle = info.module.register_forward_hook(hook, with_kwargs=True) if info is not None else None
    out_grads = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for x, (args, kwargs), g in zip(inputs, calls, grads):
            saved.clear()
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                y = _out(module(x, *args, **kwargs))
                if input_grads:
                    y.backward(g)
                    out_grads.append(x.grad)
                elif info is not None and saved["call"][3].requires_grad:
                    # the same backward nodes in the same order up to the experts output, so the same bits
                    (saved["grad"],) = torch.autograd.grad(y, saved["call"][3], g, allow_unused=True)
            if info is not None:
                call = saved["call"]
                collect_pair_weights(info, call, saved.get("grad", call[3].grad), power, index, wgu, wdn, expert_inputs)
            saved.clear()
    finally:
        if handle is not None:
            handle.remove()
        for p, f in flags:
            p.requires_grad_(f)
    return out_grads


def glas_from_graphs(kept, infos: list, batches, head_loss, power: float = 1.0,
                     expert_inputs: dict | None = None) -> GLASWeights:
    """:func:`layerwise_glas_weights` through the graphs the capture forward kept
    (:class:`~.glas_graphs.KeptGraphs`) instead of recomputing each layer; ``infos[i]``: layer ``i``'s
    experts (or None). The same backward, layer by layer from the top, so the same pair weights."""
    n_layers = len(infos)
    index, wgu, wdn = {}, {}, {}
    with deterministic_on_cpu(kept.leaves[0][0].device):
        grads = _head_grads(kept.roots[-1], batches, head_loss)
        with torch.enable_grad():
            for i in reversed(range(n_layers)):
                info, below = infos[i], []
                for bi, g in enumerate(grads):
                    y, x = kept.roots[i][bi], kept.leaves[i][bi]
                    call = kept.calls[i][bi] if info is not None else None
                    gy = None
                    if i > 0:
                        y.backward(g)
                        below.append(x.grad)
                        gy = None if call is None else call[3].grad
                    elif call is not None and call[3].requires_grad:  # the bottom layer: to its experts only
                        (gy,) = torch.autograd.grad(y, call[3], g, allow_unused=True)
                    if info is not None:
                        collect_pair_weights(info, call, gy, power, index, wgu, wdn, expert_inputs)
                for lists in (kept.leaves, kept.roots, kept.calls):
                    lists[i].clear()
                grads = below
    return _bottom_up(index, wgu, wdn)
