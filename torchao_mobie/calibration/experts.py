"""Per-expert input Hessians of a fused experts module, from the tokens the router sends to each expert.

One forward pre-hook on the experts module sees one call, read as routed rows by
:meth:`~torchao_mobie.integrations.transformers.ExpertsInfo.call` (``hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]`` for the transformers experts interface; llama4's score-scaled ``[E*T, H]`` pair rows,
see :mod:`torchao_mobie.integrations.adapters`). Per batch, the collector

* groups the routing pairs by expert (:mod:`.routing`) and adds ``X_eᵀ X_e`` for ``gate_up_proj`` and
  ``A_eᵀ A_e`` for ``down_proj``, where ``A_e = act(X_e W_gate,eᵀ)·(X_e W_up,eᵀ)`` is computed with the
  module's *current* gate_up weights (one matmul per expert, no per-token outer products);
* adds the layer-level sums ``Σ x`` and ``Σ x xᵀ`` over all tokens entering the module (router-input
  statistics and the ``gate_up_proj`` fallback Hessian; for llama4 the selected pair rows, i.e. the
  score-scaled expert inputs);
* for experts still below ``min_expert_tokens``, adds the expert's own down-proj inputs over all tokens
  (the ``down_proj`` fallback, see :mod:`.fallback`).

Everything is fp32 on the device of the expert weights.
"""

from __future__ import annotations

import torch

from ..integrations.transformers import PROJECTIONS, ExpertsCall, ExpertsInfo
from ..workers import owned_experts, reduce_sum
from .fallback import DEFAULT_MIN_EXPERT_TOKENS, FallbackEvent
from .hessian import add_outer, check_finite_activations
from .router import RouterInputStats
from .routing import route_tokens

__all__ = ["ExpertHessians", "ExpertStatsCollector"]


class ExpertHessians:
    """Finalized statistics of one projection of one experts module.

    hessian: ``[E, in, in]`` fp32 mean Hessians ``E[x xᵀ]`` (starved experts: the layer-level one).
    counts: ``[E]`` routed tokens per expert.
    fallback: the experts that use the layer-level Hessian, with the event describing it.
    """

    def __init__(self, hessian: torch.Tensor, counts: torch.Tensor, event: FallbackEvent, split=None, cross=None,
                 cross_all=None):
        self.hessian = hessian
        self.counts = counts
        self.event = event
        # (mean [E, in, in], counts [E]) over the calibration tokens that were not held back (fallback
        # experts and experts with no such token: the main Hessian), or None
        self.split = split
        # full-precision target (``fp_hidden``): mean x_fp x_qᵀ [E, in, in] over the tokens of ``split`` (those not
        # held back), or of ``hessian`` without a split; None when not collected
        self.cross = cross
        # with a split: the same mean over every token (those of ``hessian``), for the fit after the selection
        self.cross_all = cross_all

    @property
    def fit_hessian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean x_q x_qᵀ [E, in, in], counts [E]) over the tokens the fits use: those not held back."""
        return self.split if self.split is not None else (self.hessian, self.counts)

    @property
    def fallback_experts(self) -> list[int]:
        return list(self.event.experts)


class ExpertStatsCollector:
    """Accumulates the statistics of one experts module (see module docstring).

    projections: which per-expert Hessians to collect (``"gate_up_proj"``, ``"down_proj"``).
    min_expert_tokens: experts with fewer routed tokens fall back to the layer-level Hessian.
    token_mask: optional ``[T]`` bool set by the caller before each batch (False = padding, ignored).
    heldback: also keep the Hessians of the tokens that are not held back apart (the main ones are still
        over every token); the caller marks the held-back tokens with ``heldback_mask [T]`` before each batch.
    fp_target: also accumulate ``Σ x_fp x_qᵀ`` against the full-precision model's inputs of the same rows, which
        the caller sets as ``fp_hidden [rows, H]`` before each batch (with ``fp_gate_up``, the full-precision
        ``[E, 2I, H]`` weight, for ``down_proj``'s full-precision inputs); over the tokens not held back, the
        tokens of the fit Hessian (:mod:`~torchao_mobie.algorithms.fp_target`). ``fp_target_all``: with
        held-back tokens, also over every token (``ExpertHessians.cross_all``, for the fit after the selection).

    Gradient statistics (GLAS) plug in through ``observe(..., pair_weights=)``: a gradient-aware
    collector calls it from a backward hook with per-(token, slot) weights, turning each sum into
    ``Σ w x xᵀ``; nothing else changes.

    A second collector on the same calls (GLAS's, beside the plain one) computes the same unweighted values:
    :meth:`share_from` makes it take them from the first one (see there).
    """

    def __init__(self, experts: ExpertsInfo, projections=PROJECTIONS, *,
                 min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS, routing_weighted: bool = False,
                 heldback: bool = False, fp_target: bool = False, fp_target_all: bool = False):
        for p in projections:
            if p not in PROJECTIONS:
                raise ValueError(f"unknown projection {p!r}; expected one of {PROJECTIONS}")
        if min_expert_tokens < 1:
            raise ValueError(f"min_expert_tokens must be >= 1, got {min_expert_tokens}")
        self.experts = experts
        self.min_expert_tokens = int(min_expert_tokens)
        self.routing_weighted = bool(routing_weighted)
        self._pair_w_sum, self._pair_n = 0.0, 0
        self.device = experts.parameter("gate_up_proj").device
        e, h = experts.num_experts, experts.hidden_dim
        self.counts = torch.zeros(e, dtype=torch.int64, device=self.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.layer_sum_x = torch.zeros(h, device=self.device)
        self.layer_sum_xxt = torch.zeros(h, h, device=self.device)
        self.layer_tokens = 0
        self._down_all: dict[int, torch.Tensor] = {}  # starved experts' down inputs over all tokens
        self.token_mask: torch.Tensor | None = None
        self.heldback = bool(heldback)
        self.owned = owned_experts(e)  # with workers: this rank's experts (torchao_mobie.workers)
        self.heldback_mask: torch.Tensor | None = None
        self.fit_sums: dict[str, torch.Tensor] = {}
        self.fit_counts = torch.zeros(e, dtype=torch.int64, device=self.device)
        self.fp_target = bool(fp_target)
        self.fp_target_all = self.fp_target and bool(fp_target_all)
        self.fp_hidden: torch.Tensor | None = None
        self.fp_gate_up: torch.Tensor | None = None
        self.cross: dict[str, torch.Tensor] = {}  # projection -> Σ x_fp x_qᵀ [E, in, in] (tokens not held back)
        self.cross_held: dict[str, torch.Tensor] = {}  # the same over the held-back tokens
        self._handle = None
        self.source: ExpertStatsCollector | None = None  # see share_from
        self._down_cache: dict | None = None  # expert -> (rows, down inputs) of the current call, for a sharer
        for p in projections:
            self.enable(p)

    def share_from(self, source: "ExpertStatsCollector") -> "ExpertStatsCollector":
        """Take the unweighted statistics from ``source``, a collector whose hook runs just before this one's
        on every call this one observes, and which observes no other call: the layer-level sums, the starved
        experts' down inputs over every token, and each expert's ``down_proj`` inputs. They are the same
        operations on the same rows, so the results are the same bits (on qwen3moe-32e GLAS's collector made a
        third of the ``down_input`` calls). ``source`` must be finalized after this one (it frees its starved
        accumulators)."""
        if source.experts.module is not self.experts.module or source.min_expert_tokens != self.min_expert_tokens:
            raise ValueError(f"{self.experts.fqn or 'experts module'}: share_from needs a collector of the same experts "
                             "module with the same min_expert_tokens (the starved experts must be the same)")
        self.source = source
        source._down_cache = {}
        return self

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if p in self.sums)

    def enable(self, projection: str) -> None:
        """Start collecting a projection (only before any token has been observed)."""
        if projection in self.sums:
            return
        if self.layer_tokens:
            raise RuntimeError(
                f"{self.experts.fqn or 'experts module'}: cannot start observing {projection} after "
                f"{self.layer_tokens} tokens were already observed; observe all projections before calibrating")
        d = self.experts.in_features(projection)
        self.sums[projection] = torch.zeros(self.experts.num_experts, d, d, device=self.device)
        if self.heldback:
            self.fit_sums[projection] = torch.zeros(self.experts.num_experts, d, d, device=self.device)
        if self.fp_target:
            self.cross[projection] = torch.zeros(self.experts.num_experts, d, d, device=self.device)
            if self.heldback and self.fp_target_all:
                self.cross_held[projection] = torch.zeros(self.experts.num_experts, d, d, device=self.device)

    def attach(self) -> "ExpertStatsCollector":
        if self._handle is None:
            self._handle = self.experts.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._down_cache:
            self._down_cache.clear()

    def _hook(self, module, args, kwargs):
        call = self.experts.call(args, kwargs)
        top_k_index, top_k_weights = call.top_k_index, call.top_k_weights
        if self.routing_weighted and top_k_weights is not None:
            # the MoE block output is Σ g_e·expert_e(x): an error of expert e on token t is scaled by g_te
            w = top_k_weights.detach().float().reshape(top_k_index.shape) ** 2
            valid = (top_k_index >= 0) & (top_k_index < self.experts.num_experts)
            mask = call.rows(self.token_mask)
            if mask is not None:
                valid &= mask.reshape(-1, 1).to(valid.device, torch.bool)
            kept = w[valid.to(w.device)]
            self._pair_w_sum += float(kept.sum())
            self._pair_n += kept.numel()
            self.observe_call(call, pair_weights=w)
            return None
        self.observe_call(call)
        return None

    def observe_call(self, call: ExpertsCall, *, pair_weights: torch.Tensor | None = None) -> None:
        """:meth:`observe` of one call read by :meth:`ExpertsInfo.call` (rows that are not the batch's tokens
        get the token masks through ``call.token_index``)."""
        self.observe(call.hidden, call.top_k_index, call.top_k_weights, pair_weights=pair_weights,
                     token_index=call.token_index, in_layer=call.in_layer)

    # -- accumulation ------------------------------------------------------------------------------

    @torch.no_grad()
    def observe(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor | None = None, *, pair_weights: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None, in_layer: torch.Tensor | None = None) -> None:
        """Add one batch. ``top_k_weights`` is accepted for interface symmetry; Hessians are unweighted
        by routing probabilities (as BiLLM/ARB apply per expert); ``pair_weights [T, k]`` weights each
        (token, slot) pair (GLAS extension point; a ``routing_weighted`` collector passes ``g²`` from its
        hook, so each expert's Hessian measures its share of the MoE block's output error).
        ``token_index [N]``: the batch token of each row when the rows are not the tokens (the masks are per
        token); ``in_layer [N]``: the rows counted in the layer-level sums (default: all)."""
        info = self.experts
        x = hidden_states.reshape(-1, info.hidden_dim).to(device=self.device, dtype=torch.float32)
        src = self.source
        if src is None:  # a sharer's source checked the same rows
            check_finite_activations(x, info.fqn or "experts module")
        if self._down_cache is not None:
            self._down_cache.clear()
        call = ExpertsCall(x, top_k_index, top_k_weights, token_index=None if token_index is None
                           else token_index.to(self.device))
        mask = call.rows(self.token_mask)
        if mask is not None:
            mask = mask.reshape(-1).to(device=self.device, dtype=torch.bool)
            if mask.numel() != x.shape[0]:
                raise ValueError(f"token_mask has {mask.numel()} entries for {x.shape[0]} tokens")
        layer_rows = mask
        if in_layer is not None:
            in_layer = in_layer.reshape(-1).to(device=self.device, dtype=torch.bool)
            layer_rows = in_layer if mask is None else mask & in_layer
        x_layer = x if layer_rows is None else x[layer_rows]
        if src is None:
            self.layer_sum_x += x_layer.sum(0)
            add_outer(self.layer_sum_xxt, x_layer)
        self.layer_tokens += x_layer.shape[0]

        # with a split, each token goes to exactly one of two disjoint sums (fit part, held-back part in
        # self.sums); finalize adds them
        parts = [(mask, self.sums, None)]
        if self.heldback:
            held = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
            if self.heldback_mask is not None:
                held = call.rows(self.heldback_mask).reshape(-1).to(device=self.device, dtype=torch.bool)
            keep = torch.ones_like(held) if mask is None else mask
            parts = [(keep & ~held, self.fit_sums, self.fit_counts), (keep & held, self.sums, None)]
        xf = None
        if self.fp_target:
            if self.fp_hidden is None:  # the cross sums must cover the Hessian's tokens
                raise RuntimeError(f"{info.fqn or 'experts module'}: fp_target collector called without fp_hidden")
            xf = self.fp_hidden.reshape(-1, info.hidden_dim).to(device=self.device, dtype=torch.float32)
            if xf.shape != x.shape:
                raise ValueError(f"{info.fqn or 'experts module'}: fp_hidden has {tuple(xf.shape)} rows for the call's "
                                 f"{tuple(x.shape)}")
        for i, (part_mask, sums, part_counts) in enumerate(parts):
            routed = route_tokens(top_k_index.to(self.device), info.num_experts, token_mask=part_mask,
                                  pair_weights=pair_weights)
            self.counts += routed.counts
            if part_counts is not None:
                part_counts += routed.counts
            self._add(sums, routed, x, xf, self.cross if i == 0 else self.cross_held)  # parts[0]: not held back

        if "down_proj" in self.sums and src is None:
            # Experts that are (still) starved after this batch get their down-proj inputs over every token.
            # Counts only grow, so an expert starved at the end was starved after every batch and its
            # accumulator covers all of them; experts crossing the threshold drop theirs.
            starved = (self.counts < self.min_expert_tokens).nonzero().flatten().tolist()
            for e in list(self._down_all):
                if e not in starved:
                    del self._down_all[e]
            for e in starved:
                acc = self._down_all.get(e)
                if acc is None:
                    d = info.intermediate_dim
                    acc = self._down_all[e] = torch.zeros(d, d, device=self.device)
                add_outer(acc, info.down_input(x_layer, e))

    def _add(self, sums: dict, routed, x: torch.Tensor, xf: torch.Tensor | None = None, cross: dict | None = None) -> None:
        info = self.experts
        h_gu, h_dn = sums.get("gate_up_proj"), sums.get("down_proj")
        c_gu, c_dn = (cross.get("gate_up_proj"), cross.get("down_proj")) if xf is not None and cross else (None, None)
        for e, s, t in routed.segments():
            if e not in self.owned:
                continue
            rows = routed.token_idx[s:t]
            xe = x.index_select(0, rows)  # one expert's tokens at a time (bounded peak memory)
            w = None if routed.pair_weights is None else routed.pair_weights[s:t]
            if h_gu is not None:
                add_outer(h_gu[e], xe, w)
            if c_gu is not None:
                _add_cross(c_gu[e], xe, xf.index_select(0, rows), w)
            if h_dn is not None:
                ae = self._down_input(xe, e, rows)
                add_outer(h_dn[e], ae, w)
                if c_dn is not None:
                    _add_cross(c_dn[e], ae, self._fp_down_input(xf.index_select(0, rows), e), w)

    def _down_input(self, xe: torch.Tensor, e: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s ``down_proj`` inputs for ``rows`` of the call: the source's when it computed the same rows."""
        hit = None if self.source is None or self.source._down_cache is None else self.source._down_cache.get(e)
        if hit is not None and torch.equal(hit[0], rows):
            return hit[1]
        ae = self.experts.down_input(xe, e)
        if self._down_cache is not None:
            self._down_cache[e] = (rows, ae)
        return ae

    def _fp_down_input(self, xf: torch.Tensor, e: int) -> torch.Tensor:
        """``down_proj``'s input in the full-precision model: ``act(gate)·up`` of the full-precision gate_up."""
        if self.fp_gate_up is None:
            raise RuntimeError(f"{self.experts.fqn or 'experts module'}: fp_target needs fp_gate_up for down_proj")
        return self.experts.down_input(xf, e, gate_up=self.fp_gate_up)

    # -- results -----------------------------------------------------------------------------------

    def router_stats(self) -> RouterInputStats:
        """Moments of the tokens entering the experts module (= the router input in every family)."""
        own = self.source or self
        return RouterInputStats.from_sums(own.layer_sum_x, own.layer_sum_xxt, self.layer_tokens)

    def layer_hessian(self) -> torch.Tensor:
        """``E[x xᵀ]`` over all tokens entering the module (gate_up fallback)."""
        return (self.source or self).layer_sum_xxt / max(self.layer_tokens, 1)

    @torch.no_grad()
    def finalize(self, projection: str) -> ExpertHessians:
        """Mean Hessians of one projection with starved experts replaced; frees that accumulator.

        Raises if no token was observed (calibration never reached this module).
        """
        if projection not in self.sums:
            raise ValueError(f"{self.experts.fqn or 'experts module'}: {projection} was not observed "
                             f"(observed: {list(self.projections)})")
        if self.layer_tokens == 0:
            raise RuntimeError(
                f"{self.experts.fqn or 'experts module'}: no tokens were observed; run calibration batches "
                "through the model between the 'observe' and 'convert' steps")
        h = reduce_sum(self.sums.pop(projection))
        fit_sum = self.fit_sums.pop(projection, None)
        if fit_sum is not None:
            h += reduce_sum(fit_sum)
        counts = self.counts.clone()
        h.div_(counts.clamp(min=1).to(h.dtype).view(-1, 1, 1))
        starved = (counts < self.min_expert_tokens).nonzero().flatten().tolist()
        layer_h = self.layer_hessian() if projection == "gate_up_proj" else None
        # a routing-weighted collector's fallback is unweighted: bring it to the mean g² of the routed pairs
        fb = (self._pair_w_sum / max(self._pair_n, 1)) if (self.routing_weighted and self._pair_n) else 1.0
        down_all = (self.source or self)._down_all
        for e in starved:
            h[e] = fb * (layer_h if layer_h is not None else down_all[e] / self.layer_tokens)
        if projection == "down_proj":
            self._down_all.clear()
        # Experts that got enough tokens but only all-zero inputs: their Hessian carries no information
        # and GPTQ would zero the whole weight (every input column "dead"). Same fallback as starved
        # experts for gate_up; down_proj has no pooled equivalent (see .fallback), so an identity at the
        # scale of the other experts' Hessians (data-free for that expert).
        notes = []
        zero = [e for e in (h.diagonal(dim1=-2, dim2=-1).sum(-1) == 0).nonzero().flatten().tolist() if e not in starved]
        if zero:
            if layer_h is not None and bool(layer_h.diagonal().sum() > 0):
                fill, what = layer_h, "the layer-level Hessian"
            else:
                live = h.diagonal(dim1=-2, dim2=-1).mean(-1)
                scale = float(live[live > 0].mean()) if bool((live > 0).any()) else 1.0
                fill, what = scale * torch.eye(h.shape[-1], device=h.device), "an identity Hessian (data-free)"
            for e in zero:
                h[e] = fill
            notes.append(f"experts {zero} received only all-zero {projection} inputs: they use {what}")
        fallback = sorted(starved + zero)
        event = FallbackEvent(module=self.experts.fqn, projection=projection, experts=fallback,
                              token_counts=[int(counts[e]) for e in fallback],
                              min_expert_tokens=self.min_expert_tokens, layer_tokens=self.layer_tokens,
                              experts_total=self.experts.num_experts, notes=notes)
        cross = cross_all = None
        if projection in self.cross:  # over the tokens of the fit Hessian: the split's, or all without one
            n = (self.fit_counts if fit_sum is not None else counts).clamp(min=1)
            c_fit = reduce_sum(self.cross.pop(projection))
            held = self.cross_held.pop(projection, None)
            if held is not None:  # and over every token, as the Hessian
                cross_all = (c_fit + reduce_sum(held)).div_(counts.clamp(min=1).to(h.dtype).view(-1, 1, 1))
            cross = c_fit.div_(n.to(h.dtype).view(-1, 1, 1))
        split = None
        if fit_sum is not None:
            fc = self.fit_counts.clone()
            fit = fit_sum.div_(fc.clamp(min=1).to(h.dtype).view(-1, 1, 1))
            for e in set(fallback) | set((fc == 0).nonzero().flatten().tolist()):
                fit[e] = h[e]
            split = (fit, fc)
        return ExpertHessians(hessian=h, counts=counts, event=event, split=split, cross=cross, cross_all=cross_all)


def _add_cross(acc: torch.Tensor, xq: torch.Tensor, xf: torch.Tensor, w: torch.Tensor | None) -> None:
    """``acc += x_fpᵀ diag(w) x_q`` (the matching ``x_qᵀ diag(w) x_q`` is the Hessian's own sum)."""
    xfw = xf.float() if w is None else xf.float() * w.float().unsqueeze(-1)
    acc.addmm_(xfw.t(), xq.float())
