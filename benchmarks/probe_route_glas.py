"""Probe (issue 16, DeepSeek-V3 top-k): GLAS with a routing term. Not part of the package.

    LAM=10 python benchmarks/probe_route_glas.py heldout-deepseekv3-9m [seed]

The GLAS loss becomes the LM loss + LAM x a routing loss of the full-precision assignments at every router:
binary cross entropy of the chosen experts for sigmoid routers (a score-correction bias), the chosen experts'
log-softmax otherwise. Its gradient reaches the lower layers' expert outputs by every path, the residual,
attention and norms, not only the routers' row space that NGES sees. It is monkeypatched into the layer-wise GLAS
backward (``_layer_backward``: ``y.backward(g)`` also backpropagates the layer's routing loss); LAM=0 gives the
default bit for bit. One thread, as benchmarks/methods.py. Results: benchmarks/results/ds_topk_probe.md.
"""
import os
import sys

import torch
import torch.nn.functional as F
torch.set_num_threads(1)
import torchao_mobie.calibration.glas_layerwise as gl
import torchao_mobie.pipeline.sequential as seq
LAM = float(os.environ.get("LAM", "1.0"))
ROUTERS = {}
orig_lw = seq._layerwise_glas
def patched_lw(model, layout, *args, **kwargs):
    ROUTERS.clear()
    for L in layout.layers:
        if L.moe is not None:
            ROUTERS[id(L.module)] = L.moe.router
    return orig_lw(model, layout, *args, **kwargs)
seq._layerwise_glas = patched_lw
orig = gl._layer_backward
def _route_loss(router, out):
    logits, idx = out[0], out[2]
    y = torch.zeros_like(logits).scatter_(1, idx.long(), 1.0)
    if getattr(router, "e_score_correction_bias", None) is not None:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    return -(F.log_softmax(logits, -1) * y).sum()
def patched(module, info, inputs, calls, grads, power, index, wgu, wdn):
    router = ROUTERS.get(id(module))
    if router is None or LAM == 0:
        return orig(module, info, inputs, calls, grads, power, index, wgu, wdn)
    saved = {}
    h = router.register_forward_hook(lambda m, a, o: saved.__setitem__("o", o))
    # run the original with y.backward(g) replaced: torch.Tensor.backward is patched for this call only
    real_backward = torch.Tensor.backward
    def bw(self, gradient=None, *a, **k):
        if "o" in saved and gradient is not None:
            R = LAM * _route_loss(router, saved.pop("o"))
            return torch.autograd.backward([self, R], [gradient, torch.ones_like(R)])
        return real_backward(self, gradient, *a, **k)
    torch.Tensor.backward = bw
    try:
        return orig(module, info, inputs, calls, grads, power, index, wgu, wdn)
    finally:
        torch.Tensor.backward = real_backward
        h.remove()
gl._layer_backward = patched
from torchao_mobie.eval.report import compare_methods
from torchao_mobie.cli import make_config
model = sys.argv[1]; seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
rows = compare_methods(model, {"mobie": make_config("mobie")}, seed=seed, progress=False)
for r in rows:
    print("ROW", model, seed, "lam", LAM, r["all_inclusive_bits"], r["wikitext2_gap"], r["wikitext2_topk_kept"], r["wikitext2_topk_kept_by_layer"], flush=True)
