"""MoBiE's config: the method's switches, its bit budget and how each projection spends it.

A plain dataclass with validation; the method itself is :mod:`torchao_mobie.methods.mobie` (the algorithms:
:mod:`torchao_mobie.algorithms` ``cejd``, ``nges``, ``planner``; the statistics: :mod:`torchao_mobie.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .algorithms.result import BinarizedWeight
from .methods import mobie as _method
from .methods.base import BinarizationConfig, BinarizedExperts, QuantContext, check_int

__all__ = ["MoBiEConfig"]

_BACKBONE_DTYPES = ("auto", "bfloat16", "int8", "float32")


@dataclass
class MoBiEConfig(BinarizationConfig):
    """MoBiE (Zhao, Xu et al., arXiv 2604.06798), reconstructed: Mixture of Binary Experts.

    Three switchable components (all on by default):

    * ``cejd`` — cross-expert joint decomposition (:mod:`torchao_mobie.algorithms.cejd`): per projection
      of a layer, a shared high-precision backbone on the cheaper side (input side ``W_e ≈ Q_e·S`` when
      in ≤ out, output side ``W_e ≈ M·Q_e`` otherwise) and a per-expert binary factor
      ``Q_e = diag(row_scale)·sign·diag(col_scale)``, binarized with GPTQ compensation in the factor's
      transformed metric, the backbone and the scales refit by least squares on the layer output error.
      Which layout a projection gets (backbone on the input side, the output side, or none: the factor fit
      on each ``W_e`` directly) is chosen from calibration data (``select``): each is fit on 3/4 of the
      calibration sequences and judged by the LM loss of the other 1/4; a joint layout must win clearly.
      With the budget spent on second planes, per-expert factors won every projection of the zoo and of
      the held-out models measured so far (benchmarks/results/heldout_mobie.md). Off: per-expert only.
    * ``glas`` — global loss-aligned saliency (:mod:`torchao_mobie.calibration.gradients`): one backward
      pass of the full-precision LM loss gives per routed (token, expert) weights
      ``w = mean_j (∂ℓ/∂Z_j)²`` at each expert projection output ``Z``; the Hessians become
      ``(1−λ)·H/tr H + λ·H_w/tr H_w`` (per layer, λ = ``glas_lambda``), used everywhere.
    * ``nges`` — null-space guided expert-shift suppression (:mod:`torchao_mobie.algorithms.nges`):
      ``down_proj`` errors are measured with the output metric ``G = I + μ·P`` (P: routing-sensitive
      directions of the later layers' routers, μ = ``nges_mu``) when fitting scales and backbone, which
      pushes the error into the routers' null space at no storage cost.

    Args (besides :class:`BinarizationConfig`'s):
        packed: True (default) = the quantized routed experts end as packed 1-bit :class:`~torchao_mobie.storage.MoBiETensor`
            parameters (:mod:`torchao_mobie.storage`) with the ``"mobie"`` experts implementation, and
            ``save_pretrained`` writes the packed format, as a torchao config leaves its tensor subclass:
            ``quantize_model`` packs once every layer is done (the sequential pass runs on the fake-quant
            weights), ``quantize_`` each experts module once it is binarized. False = fake-quant (research): the
            dequantized weights in the original parameters and dtype, bit for bit the packed tensor's
            ``dequantize()``; :func:`~torchao_mobie.storage.pack_model` packs them later. Linears binarized by
            a wider ``scope`` (attention, shared experts, dense MLPs) stay fake-quant either way.
        backbone_dtype: stored width of the shared backbone: "int8" (one fp16 scale per row),
            "bfloat16", "float32", or "auto" (default) = int8: its rounding error (~0.3% of the backbone)
            is far below the binary factor's, and the bits it saves buy salient second planes (mixtral-8e,
            150 windows: int8 gap 0.060 at 2.08 bits vs bfloat16 0.063 at 2.36 bits).
        gate_up_blocks: diagonal blocks of an output-side gate_up backbone (2 = separate gate and up
            backbones, half the cost); 1 = one backbone.
        rounds: binarize ↔ backbone-refit alternations (CEJD).
        refine: rounds of greedy sign coordinate descent + scale refit after the GPTQ sign pass of the last
            alternation (2 vs 1: gap 0.0519 vs 0.0588 on mixtral-8e, 0.0468 vs 0.0486 on qwen3moe-32e,
            150 windows, seed 0). Earlier alternations stop at GPTQ: refining there anchors the backbone
            refit to those signs (captured mixtral-8e gate_up layers: objective +19%).
        polish: refinement rounds against the final stored (int8-rounded, refit) backbone (captured
            layers: objective -2% on qwen3moe-32e, -5% on mixtral-8e, for ~+8% time).
        salient_cols: per expert, factor columns with a second binary plane (largest output-error
            energy); None = as many as the bit budget leaves (up to all of them: a full second plane).
        route_weighted: weight each routed token of an expert's Hessian by its squared routing weight
            ``g²`` (``Σ g²·x xᵀ``): the MoE block output is ``Σ g_e·expert_e(x)``, so this is the block's
            output error rather than the expert's own (BiLLM/ARB's per-expert convention). Off by default:
            with the budget spent on planes it made the zoo worse (benchmarks/results/zoo_ablation_planes.md,
            3 seeds, gap off vs on: mixtral-8e 0.0246 vs 0.0266, beyond the seed spread; qwen3moe-32e 0.0231
            vs 0.0240, olmoe-32e 0.0212 vs 0.0219, qwen2moe-32e-shared 0.0169 vs 0.0166), and the held-out
            models agree (heldout_ablation_planes.md: off better or level on all six). GLAS's gradients
            already carry the routing weight of every (token, expert) pair (``∂ℓ/∂Z_e`` includes ``g_e``).
            Before the planes it helped at seed 0 (ablation.md: 0.0212 vs 0.0234 on qwen2moe-32e-shared).
        scale_rounds: closed-form row/column scale alternations per refit (1: every refinement round refits
            the scales again, so more alternations only cost time: captured layers within ±1%, -25% time).
        glas_lambda: mixing weight of the gradient-weighted Hessian, in [0, 1].
        glas_power: exponent applied to the per-pair GLAS weights ``w = mean_j (∂ℓ/∂Z_j)²`` before they
            weight ``H_w`` (in (0, 1]). The weights are heavy-tailed (zoo models: the top 1% of routed pairs
            carry 20-44% of the mass), so a power below 1 lets more tokens shape each expert's ``H_w``.
            Measured at 0.5 (3 seeds, WikiText-2 gap vs 1.0): qwen2moe-32e-shared 0.0181 vs 0.0181,
            qwen3moe-32e 0.0292 vs 0.0290, olmoe-32e 0.0228 vs 0.0221, mixtral-8e 0.0337 vs 0.0346; with PTB
            calibration (seed 0) mixtral-8e 0.103 vs 0.117, qwen2moe 0.069 vs 0.069. No clear gain: default 1.
        glas_samples: calibration sequences that get the GLAS backward pass (rounded up to whole
            calibration batches; the first ones); None = all. ``H_w`` is trace-normalized, so a subsample
            estimates the same matrix; the backward pass is the largest single cost of MoBiE after CEJD.
        nges_mu: strength of the router-subspace penalty (0 disables the metric even with nges=True).
        nges_decay: weight of the router of layer l+1+d is ``nges_decay**d``.
        percdamp: damping of the factor Hessian in the GPTQ sign pass (default 0.1: measured better on
            held-out calibration statistics than 0.01).
        rank_damp: ridge ``rank_damp·mean(diag H_e)·I`` on every non-fallback expert routed fewer calibration
            tokens than its inputs (singular Hessian), for all CEJD fits; 0 = off. Without it the joint fits
            diverged on such an expert and the shared backbone spread the damage (held-out mixtral-9m seed 2,
            layer 1 down_proj: 162 tokens for 288 inputs, 3860x its weight norm, output error 0.02-0.73 of
            the energy vs 0.002-0.008; gap 0.060 vs 0.010). GPTQ's 1% damping; benchmarks/results/rank_damp.md.
        hdamp: ridge ``hdamp·mean(diag H)·I`` added to every expert Hessian for all CEJD fits (limits
            over-fitting the calibration tokens). Default 0. None = 1.0 for input-side backbones of coarse
            layers (< 16 experts), 0 elsewhere: it lowered the held-out MoE-block error of mixtral-8e
            layer 2 (0.095 → 0.076) but made the end-to-end gap of its layer 0 worse (0.052 → 0.057), and
            every ridge made qwen3moe-32e worse, so it is off by default.
        side: backbone side, "auto", "input" or "output" (for every projection). "auto" with ``select``:
            per projection, the layout (input-side or no backbone; the output side lost every selection it
            entered, so it is no longer judged) with the lowest LM loss
            on held-back calibration sequences, each filling the budget with second planes
            (:mod:`torchao_mobie.algorithms.planner`); without ``select``: input side when its int8
            backbone leaves 0.1 bit for second planes, else the cheaper side.
        select: choose the layout per projection by held-back loss: every candidate is fit in full on
            three quarters of the calibration sequences and judged on the fourth (one cheap alternation
            misranked them: captured held-out mixtral-9m layers, where the joint backbones need their refits).
        select_margin: a joint layout displaces per-expert factors only when its held-back loss is lower by
            more than this many standard errors of the per-sequence difference.
        select_probe: MoE layers (from the first) on which every layout is a candidate; later layers only
            try the layouts that won a projection of the same kind on the probe layers, and drop one as soon
            as it loses (with per-expert factors winning everywhere on the zoo, the joint fits are then paid
            once, not per layer; on olmoe-32e an input-side backbone won layer 0's down_proj and lost on the
            three layers after it, each of which paid two more fits for that).
        select_refit: fit the chosen layout again on every calibration sequence (else keep its fit on
            the three quarters).
        router_align: refit each MoE router (kept in full precision) after its layer's experts are binarized,
            so that its logits on the quantized model's inputs match the full-precision model's on the
            calibration tokens (ridge least squares, :mod:`torchao_mobie.calibration.router_align`): expert
            shift suppressed on the router's side, at no storage cost. Needs :func:`~torchao_mobie.quantize_model`'s
            sequential pass (``quantize_model``, ``quantize_streaming``). Top-k agreement +0.0012 to +0.0046 on
            the four zoo and six core held-out models (3 seeds, benchmarks/results/router_align.md), the
            gap level or lower except on olmoe-32e (0.0212 → 0.0223, beyond the seed spread): off by default.
        router_align_ridge: its ridge toward the original router, relative to the mean input energy.
        router_align_judge: keep a router's refit only when it lowers the LM loss of the held-back calibration
            sequences (the layout judge's, run from that layer on; without held-back sequences every refit is
            kept). Off: on the zoo (3 seeds) it halved the top-k gain and moved no gap beyond the spread;
            olmoe-32e's gap, which the refit raises (0.0212 → 0.0223), stayed up (0.0220).
        fp_target: fit each expert projection to the full-precision model's output on the calibration tokens,
            ``Σ ||Q x_q − W x_fp||²``, instead of to its own weight on the quantized model's inputs: the
            weight is replaced by the least-squares target ``W (C + λI)(H + λI)⁻¹`` (``C = Σ x_fp x_qᵀ``) before
            the fit (:mod:`torchao_mobie.algorithms.fp_target`), so the binarized layers partly undo the error
            of the ones before them and, for down_proj, of their own gate_up. No storage; one more forward
            per layer. Needs the sequential pass (``quantize_model``, ``quantize_streaming``); the torchao
            flows observe the full-precision model, where the target is the weight itself. Zoo, 3 seeds
            (benchmarks/results/fp_target.md), gap off → on: mixtral-8e 0.0246 → 0.0237, qwen2moe-32e-shared
            0.0169 → 0.0138, olmoe-32e 0.0212 → 0.0177, qwen3moe-32e 0.0231 → 0.0245 (within its seed spread).
        fp_target_ridge: its ridge λ toward ``W``, relative to ``mean(diag H_e)`` per expert (0.01: the lowest
            mean zoo gap of 0.001 / 0.01 / 0.1, seed 0).
        fp_target_refit: with held-back sequences (``select``), the candidates are fit to the target over
            the tokens not held back (the judge's sequences must stay out of sample); with this on, the final
            fit on every token (``select_refit``, and every projection with one candidate) is fit to the target
            over every token, else to the candidates' target. None: on for layers with 16 or more experts, off
            on coarse ones. Zoo, 3 seeds (benchmarks/results/fp_target_refit.md), gap off → on: qwen3moe-32e
            0.0234 → 0.0221, qwen2moe-32e-shared 0.0144 → 0.0131, olmoe-32e 0.0172 → 0.0173, but mixtral-8e
            0.0236 → 0.0252 (none beyond its seed spread).
        max_bits: cap on all-inclusive bits per expert weight used by the automatic choices (layout,
            number of full planes and salient columns); None = 1.5 on fine-grained layers (>= 16 experts),
            2.2 on coarse ones (packed experts <= 14% of bf16). The cap holds per layer: down_proj has first
            call, up to two full planes (a plane ahead of gate_up from ~2.5 bits on), and gate_up (2/3 of
            the weights) gets the rest (:func:`~torchao_mobie.algorithms.planner.gate_up_target`). Up to
            four full planes (``planner.MAX_PLANES``) plus a salient plane: caps up to ~4.5 bits are spent.

    Defaults (rounds=2, refine=2, polish=1, scale_rounds=1, percdamp=0.1, glas_lambda=0.5, nges_mu=1) were chosen
    on qwen3moe-32e / mixtral-8e layer and end-to-end measurements (glas_lambda=1.0 was catastrophic:
    gap 0.18 vs 0.04; more rounds/refine lower the calibration error a little and cost time).

    Representation: ``BinarizedExperts.factors``, a :class:`~torchao_mobie.algorithms.factors.CEJDFactors`
    (per-expert binary factors with 8-bit log-coded scales, optional further full planes and salient plane,
    the shared backbone stored once; its docstring has the formula).
    """

    packed: bool = True
    cejd: bool = True
    glas: bool = True
    nges: bool = True
    backbone_dtype: str = "auto"
    gate_up_blocks: int = 1
    rounds: int = 2
    scale_rounds: int = 1
    glas_lambda: float = 0.5
    glas_power: float = 1.0
    glas_samples: int | None = None
    nges_mu: float = 1.0
    nges_decay: float = 0.5
    refine: int = 2
    polish: int = 1
    route_weighted: bool = False
    salient_cols: int | None = None
    max_bits: float | None = None
    percdamp: float = 0.1
    hdamp: float | None = 0.0
    rank_damp: float = 0.01
    side: str = "auto"
    select: bool = True
    select_refit: bool = True
    select_margin: float = 2.0
    select_probe: int = 1
    router_align: bool = False
    router_align_ridge: float = 0.01
    router_align_judge: bool = False
    fp_target: bool = True
    fp_target_ridge: float = 0.01
    fp_target_refit: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        n = "MoBiEConfig"
        for f in ("packed", "cejd", "glas", "nges", "route_weighted", "select", "select_refit", "router_align",
                  "router_align_judge", "fp_target"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{n}.{f} must be a bool, got {getattr(self, f)!r}")
        if self.side not in ("auto", "input", "output"):
            raise ValueError(f"{n}.side must be 'auto', 'input' or 'output', got {self.side!r}")
        if self.backbone_dtype not in _BACKBONE_DTYPES:
            raise ValueError(f"{n}.backbone_dtype must be one of {_BACKBONE_DTYPES}, got {self.backbone_dtype!r}")
        check_int(n, "gate_up_blocks", self.gate_up_blocks, 1)
        check_int(n, "rounds", self.rounds, 1)
        check_int(n, "scale_rounds", self.scale_rounds, 1)
        check_int(n, "refine", self.refine, 0)
        check_int(n, "polish", self.polish, 0)
        if self.hdamp is not None and (isinstance(self.hdamp, bool) or not isinstance(self.hdamp, (int, float))
                                       or self.hdamp < 0):
            raise ValueError(f"{n}.hdamp must be None or a float >= 0, got {self.hdamp!r}")
        if isinstance(self.rank_damp, bool) or not isinstance(self.rank_damp, (int, float)) or self.rank_damp < 0:
            raise ValueError(f"{n}.rank_damp must be a float >= 0, got {self.rank_damp!r}")
        if self.salient_cols is not None:
            check_int(n, "salient_cols", self.salient_cols, 0)
        if self.glas_samples is not None:
            check_int(n, "glas_samples", self.glas_samples, 1)
        if isinstance(self.glas_power, bool) or not isinstance(self.glas_power, (int, float)) or not (
                0 < self.glas_power <= 1):
            raise ValueError(f"{n}.glas_power must be a float in (0, 1], got {self.glas_power!r}")
        check_int(n, "select_probe", self.select_probe, 0)
        if self.fp_target_refit is not None and not isinstance(self.fp_target_refit, bool):
            raise ValueError(f"{n}.fp_target_refit must be None or a bool, got {self.fp_target_refit!r}")
        for f in ("router_align_ridge", "fp_target_ridge"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{n}.{f} must be a float > 0, got {v!r}")
        if isinstance(self.select_margin, bool) or not isinstance(self.select_margin, (int, float)) or \
                not self.select_margin >= 0:
            raise ValueError(f"{n}.select_margin must be a float >= 0, got {self.select_margin!r}")
        for f, lo, hi in (("glas_lambda", 0.0, 1.0), ("nges_decay", 0.0, 1.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise ValueError(f"{n}.{f} must be a float in [{lo}, {hi}], got {v!r}")
        if isinstance(self.nges_mu, bool) or not isinstance(self.nges_mu, (int, float)) or self.nges_mu < 0:
            raise ValueError(f"{n}.nges_mu must be a float >= 0, got {self.nges_mu!r}")
        if self.max_bits is not None and (isinstance(self.max_bits, bool) or not isinstance(self.max_bits, (int, float))
                                          or self.max_bits <= 1.0):
            raise ValueError(f"{n}.max_bits must be None or a float > 1, got {self.max_bits!r}")

    @property
    def needs_gradients(self) -> bool:
        """True when the pipeline must run the GLAS backward pass before the sequential pass."""
        return self.glas and self.glas_lambda > 0

    @property
    def needs_heldback(self) -> bool:
        """True when the plan is chosen among layouts, by the error on held-back calibration tokens."""
        return self.cejd and self.side == "auto" and self.select

    def quantize_experts(self, W3d, H3d, *, context: QuantContext | None = None) -> BinarizedExperts:
        """Plan and fit one projection (:func:`torchao_mobie.methods.mobie.quantize_experts`)."""
        return _method.quantize_experts(self, W3d, H3d, context)

    def binarize_matrix(self, W, H) -> BinarizedWeight:
        return _method.binarize_matrix(self, W, H)
