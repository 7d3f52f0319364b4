"""GLAS (global loss-aligned saliency): per routed (token, expert) weights from the full-precision LM loss.

One forward + backward pass of the full-precision model on the calibration batches (before the
sequential pass) gives, at every MoE block output ``y = Σ_e g_e·down_e(h_e)``, the gradient
``∂ℓ/∂y`` per token. For each routed pair (token t, expert e) the gradients at the expert's projection
outputs follow analytically, with the full-precision expert weights:

* ``down_proj``: ``Z = h W_downᵀ``, ``∂ℓ/∂Z = g_e · ∂ℓ/∂y_t``;
* ``gate_up_proj``: ``Z = x W_gate_upᵀ``, ``∂ℓ/∂Z`` = backprop of ``g_e · W_downᵀ ∂ℓ/∂y_t`` through the
  gated activation (``act(gate)·up``, the module's own ``_apply_gate``).

They are reduced at once to one scalar per pair, ``w = mean_j (∂ℓ/∂Z_j)²`` (GuidedQuant's objective
with one output-channel group), so memory is ``N·k`` scalars per projection per layer (never per-token
gradient vectors for all layers). In the sequential pass :class:`GLASCollector` turns them into
``H_w = Σ w·x xᵀ`` next to the ordinary Hessian; a pair whose expert the partly quantized model routes
differently from the full-precision one gets the mean weight of its token.

:func:`compute_glas_weights` is the whole-model form (one graph through every layer per batch), kept as the
reference; the pipelines use the layer-wise form with bounded memory,
:func:`~.glas_layerwise.layerwise_glas_weights`, which gives the same weights (bit for bit on the zoo).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.transformers import ExpertsInfo
from .experts import ExpertStatsCollector

__all__ = ["GLASWeights", "compute_glas_weights", "saved_call", "pair_gradient_weights", "GLASCollector",
           "match_pair_weights"]


@dataclass
class GLASWeights:
    """Per MoE layer (keyed by experts fqn), per calibration batch: FP routing and per-pair weights.

    index[b]: ``[T_b, k]`` full-precision top-k experts; gate_up[b], down[b]: ``[T_b, k]`` weights.
    """

    index: dict
    gate_up: dict
    down: dict

    @property
    def n_batches(self) -> int:
        return len(next(iter(self.index.values()), []))

    def batch(self, fqn: str, projection: str, b: int):
        src = self.gate_up if projection == "gate_up_proj" else self.down
        return self.index[fqn][b], src[fqn][b]


def pair_gradient_weights(info: ExpertsInfo, x: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``mean_j (∂ℓ/∂Z_j)²`` at gate_up and down outputs: two ``[T, k]`` fp32 tensors.

    x ``[T, H]`` experts input, ``top_k_index/top_k_weights [T, k]``, grad_y ``[T, H]`` = ∂ℓ/∂(experts output).
    """
    T, k = top_k_index.shape
    x = x.detach().float()
    gy = grad_y.detach().float()
    g = top_k_weights.detach().float()
    w_gu = torch.zeros(T, k)
    w_dn = torch.zeros(T, k)
    E = info.num_experts
    idx = top_k_index.long()
    W_gu = info.weight("gate_up_proj").detach().float()
    W_dn = info.weight("down_proj").detach().float()
    b_gu = info.bias("gate_up_proj")
    ts, ss, zs, ghs = [], [], [], []
    for e in range(E):
        sel = (idx == e).nonzero()
        if sel.numel() == 0:
            continue
        t, s = sel[:, 0], sel[:, 1]
        gz_dn = g[t, s, None] * gy[t]  # ∂ℓ/∂Z_down  [n, H]
        w_dn[t, s] = gz_dn.pow(2).mean(-1).cpu()
        z = x[t] @ W_gu[e].t()
        if b_gu is not None:
            z = z + b_gu[e].detach().float()
        ts.append(t)
        ss.append(s)
        zs.append(z)
        ghs.append(gz_dn @ W_dn[e])  # ∂ℓ/∂h  [n, I]
    if zs:
        # one backward through the (row-wise) gated activation for all pairs of the layer
        with torch.enable_grad():
            z = torch.cat(zs).requires_grad_(True)
            h = info.apply_gate(z)
            (gz,) = torch.autograd.grad(h, z, grad_outputs=torch.cat(ghs))
        t, s = torch.cat(ts), torch.cat(ss)
        w_gu[t, s] = gz.pow(2).mean(-1).cpu()
    return w_gu, w_dn


def lm_loss_sum(logits: torch.Tensor, batch) -> torch.Tensor:
    """Summed next-token cross entropy over non-padding tokens: GLAS's loss in both passes (summed, not
    averaged, so a token's gradient does not depend on how many tokens share its batch)."""
    lp = logits[:, :-1].float()
    tgt = batch.input_ids[:, 1:]
    if batch.attention_mask is not None:
        tgt = tgt.masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")


def saved_call(info: ExpertsInfo, args: tuple, kwargs: dict, output) -> tuple:
    """``(hidden, top_k_index, top_k_weights, output)`` of one experts call in a GLAS pass, the output
    keeping its gradient (rows: tokens; llama4: score-scaled pair rows with output weight 1)."""
    call = info.call(args, kwargs)
    out = output[0] if isinstance(output, (tuple, list)) else output
    if out.requires_grad:
        out.retain_grad()
    return call.hidden.detach(), call.top_k_index.detach(), call.top_k_weights.detach(), out


@contextmanager
def deterministic_on_cpu(device):
    """With more than one CPU thread the MoE block's backward (index accumulation) sums in a run-dependent
    order, so the same calibration gave different quantized models; deterministic kernels fix that and are
    bitwise identical to the default ones on one thread."""
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if on_cpu:
            torch.use_deterministic_algorithms(det[0], warn_only=det[1])


def collect_pair_weights(info: ExpertsInfo, call: tuple, gy, power: float, index: dict, wgu: dict, wdn: dict,
                         expert_inputs: dict | None = None) -> None:
    """One batch's pair weights of one experts module from its :func:`saved_call` and the gradient ``gy`` at
    its output (None: zero), appended per fqn (``expert_inputs``: also its input rows, fp32 ``[N, H]``)."""
    hs, ti, tw, out = call
    H = info.hidden_dim
    gy = gy if gy is not None else torch.zeros_like(out)
    gu, dn = pair_gradient_weights(info, hs.reshape(-1, H), ti.reshape(hs.reshape(-1, H).shape[0], -1),
                                   tw.reshape(-1, ti.shape[-1]), gy.reshape(-1, H))
    index.setdefault(info.fqn, []).append(ti.reshape(-1, ti.shape[-1]).cpu())
    if expert_inputs is not None:
        expert_inputs.setdefault(info.fqn, []).append(hs.float().reshape(-1, H))
    wgu.setdefault(info.fqn, []).append(gu if power == 1 else gu.pow(power))
    wdn.setdefault(info.fqn, []).append(dn if power == 1 else dn.pow(power))


def compute_glas_weights(model: nn.Module, experts: list[ExpertsInfo], batches, power: float = 1.0) -> GLASWeights:
    """One forward+backward of the full-precision LM loss per calibration batch (parameters frozen).

    ``batches``: objects with ``input_ids`` and ``attention_mask`` (as built by ``quantize_model``).
    The loss is the summed next-token cross entropy over non-padding tokens (the pair weights are only used
    trace-normalized, and a sum keeps batches of any size on one scale). ``power``: the pair weights
    are returned as ``w ** power`` (see ``MoBiEConfig.glas_power``).
    """
    index = {e.fqn: [] for e in experts}
    wgu = {e.fqn: [] for e in experts}
    wdn = {e.fqn: [] for e in experts}
    saved: dict[str, tuple] = {}
    handles = []

    def make_hook(info):
        def hook(module, args, kwargs, output):
            saved[info.fqn] = saved_call(info, args, kwargs, output)
        return hook

    emb = model.get_input_embeddings()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handles.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    for info in experts:
        handles.append(info.module.register_forward_hook(make_hook(info), with_kwargs=True))
    try:
        with deterministic_on_cpu(next(model.parameters()).device):
            for b in batches:
                saved.clear()
                with torch.enable_grad():
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                    # summed, not averaged: each token's gradient must not depend on how many tokens share its
                    # batch (held-back batches are smaller: averaging weighted their tokens 3x, 9x in w)
                    loss = lm_loss_sum(logits, b)
                    loss.backward()
                for info in experts:
                    collect_pair_weights(info, saved[info.fqn], saved[info.fqn][3].grad, power, index, wgu, wdn)
                del logits, loss
                saved.clear()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return GLASWeights(index, wgu, wdn)


def match_pair_weights(top_k_index: torch.Tensor, fp_index: torch.Tensor, fp_weights: torch.Tensor) -> torch.Tensor:
    """Weights ``[T, k]`` for the current routing: the FP pair's weight when the expert is among the
    token's FP top-k, else the mean weight of the token's FP pairs."""
    idx = top_k_index.reshape(fp_index.shape[0], -1).to(fp_index.device)
    eq = idx[:, :, None] == fp_index[:, None, :]
    w = (eq.to(fp_weights.dtype) * fp_weights[:, None, :]).sum(-1)
    return torch.where(eq.any(-1), w, fp_weights.mean(-1, keepdim=True).expand_as(w))


class GLASCollector(ExpertStatsCollector):
    """Expert statistics weighted per routed pair by GLAS weights (``Σ w·x xᵀ``).

    Before each batch the caller sets ``fp_routing = (fp_index [T, k], fp_weights [T, k])``, or None for
    a batch without gradients (``glas_samples``), which is then not observed.
    """

    fp_routing: tuple | None = None

    def _hook(self, module, args, kwargs):
        if self.fp_routing is None:
            return None
        call = self.experts.call(args, kwargs)
        fp_index, fp_w = self.fp_routing
        w = match_pair_weights(call.top_k_index.cpu(), fp_index, fp_w).to(self.device)
        self.observe_call(call, pair_weights=w)
        return None

    def guided_hessian(self, projection: str) -> torch.Tensor:
        """``Σ_pairs w·x xᵀ`` per expert ``[E, in, in]`` (sum form; frees the accumulator)."""
        hess = self.finalize(projection)
        return hess.hessian * hess.counts.clamp(min=1).to(hess.hessian.dtype)[:, None, None]
