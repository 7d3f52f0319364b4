"""Binarization configs: torchao ``AOBaseConfig`` dataclasses, one per method.

Every config is usable three ways:

* ``torchao_mobie.quantize_model(model, cfg, calibration)``: sequential (GPTQ-order) calibration;
* ``torchao_mobie.quantize_(model, cfg)`` / ``torchao.quantize_(model, cfg, filter_fn=moe_experts_filter)``
  / ``FqnToConfig({r"re:.*\\.experts\\.gate_up_proj": cfg, ...})``: torchao-native, with
  ``step="observe"`` then ``step="convert"`` (or ``convert`` alone = data-free);
* directly: ``cfg.quantize_experts(W3d, H3d)`` / ``cfg.binarize_matrix(W, H)``.

The primary interface is :meth:`BinarizationConfig.quantize_experts`, which receives a whole
``[E, out, in]`` projection and its per-expert Hessians ``[E, in, in]`` at once, so methods that couple
experts (MoBiE's joint decomposition) override it; the base implementation loops over experts with
:meth:`binarize_matrix`. Subclasses are registered with torchao's ``quantize_`` automatically.

Bit conventions (:class:`~torchao_mobie.algorithms.BitBudget`): ``paper_bits`` counts sign planes and
bitmaps per weight (the BiLLM / ARB-LLM papers' ~1.1 bits); ``all_inclusive_bits`` adds every stored
scale, mean and shared backbone value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .algorithms.result import BinarizedWeight, BitBudget
from .calibration.fallback import DEFAULT_MIN_EXPERT_TOKENS
from .calibration.router import RouterInputStats

__all__ = [
    "Scope",
    "ALL_SCOPES",
    "BinarizedExperts",
    "QuantContext",
    "BinarizationConfig",
    "MoBiEConfig",
]

_BASELINES = ("SignBinaryConfig", "BiLLMConfig", "ARBLLMConfig", "HBLLMConfig")


def __getattr__(name):
    """The baseline configs live in :mod:`torchao_mobie.baselines`; they are still reachable here, so
    configs serialized as ``torchao_mobie.config.BiLLMConfig`` keep loading."""
    if name in _BASELINES:
        from . import baselines

        return getattr(baselines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Scope(str, enum.Enum):
    """What a config may binarize. Routers, gates, embeddings, norms and lm_head never are."""

    ROUTED_EXPERTS = "routed_experts"  # the fused 3D experts (gate_up_proj, down_proj)
    SHARED_EXPERTS = "shared_experts"  # qwen2_moe shared_expert, deepseek shared_experts (not their gate)
    ATTENTION = "attention"  # every nn.Linear of a decoder layer outside its MLP / MoE block
    DENSE_MLP = "dense_mlp"  # MLP of non-MoE layers (deepseek first_k_dense_replace, mlp_only_layers)


ALL_SCOPES = [s.value for s in Scope]
_NEVER = ("router", "routers", "gate", "gates", "embed", "embeddings", "embed_tokens", "norm", "norms",
          "layernorm", "lm_head")
_STEPS = ("observe", "convert")


class BinarizedExperts(NamedTuple):
    """Result of :meth:`BinarizationConfig.quantize_experts`.

    weight: ``[E, out, in]`` fp32 dequantized weights; bits: summed over experts; parts: per expert.
    """

    weight: torch.Tensor
    bits: BitBudget
    parts: list


@dataclass
class QuantContext:
    """What the pipeline knows about the matrix being binarized (for methods that need more than W, H).

    name: parameter fqn (may be a module-relative name in torchao handlers).
    projection: "gate_up_proj" | "down_proj" for experts, "weight" for nn.Linear.
    data_free: the Hessian is the identity because no calibration data was seen.
    token_counts: ``[E]`` routed tokens per expert (experts only, None when data-free).
    fallback_experts: experts whose Hessian is the layer-level one.
    router_stats: router-input moments of the layer, when known (for expert-shift-aware methods).
    guided_hessian: ``[E, in, in]`` gradient-weighted Hessians ``Σ w·x xᵀ`` (sums over routed pairs,
        GLAS), when the config asked for gradients (``needs_gradients``).
    downstream_routers: ``[(W_router·diag(γ) [E', H], mean router input [H] or None), ...]`` of the
        routers of the following MoE layers, nearest first (for NGES on down_proj).
    """

    name: str = ""
    projection: str = "weight"
    data_free: bool = False
    token_counts: torch.Tensor | None = None
    fallback_experts: list[int] = field(default_factory=list)
    router_stats: RouterInputStats | None = None
    guided_hessian: torch.Tensor | None = None
    downstream_routers: list = field(default_factory=list)


def _binarization_handler(module: torch.nn.Module, config: "BinarizationConfig", *, parameter_name: str | None = None):
    """torchao ``quantize_`` handler shared by every :class:`BinarizationConfig` subclass.

    ``parameter_name`` (keyword-only, as torchao's FqnToConfig requires): ``gate_up_proj`` /
    ``down_proj`` of an experts module or ``weight`` of an nn.Linear; None = every binarizable parameter.
    """
    from .api import binarize_module  # late import: api imports this module

    return binarize_module(module, config, parameter_name=parameter_name)


@dataclass
class BinarizationConfig(AOBaseConfig):
    """Common fields of every binarization method (abstract: use a subclass).

    These baselines are **fake-quant**: the dequantized binary weights are written back into the
    original parameters in their original dtype, so nothing is saved in memory; the storage a packed
    format would need is reported as a :class:`~torchao_mobie.algorithms.BitBudget`.

    Args:
        scope: what to binarize, a list of :class:`Scope` values. Default: routed experts only.
            Routers, gates (e.g. ``shared_expert_gate``), embeddings, norms and lm_head are never binarized.
        blocksize: columns per block of error compensation / salient-column search (BiLLM: 128).
        percdamp: Hessian damping, fraction of the mean diagonal added to it (GPTQ/BiLLM: 0.01).
        min_expert_tokens: an expert routed fewer calibration tokens than this uses the layer-level
            Hessian (see :mod:`torchao_mobie.calibration.fallback` for the rule and the default).
        step: "convert" (binarize; with prior observation, from its statistics, else data-free) or
            "observe" (install statistics observers; torchao-native two-step flow).
    """

    scope: list = field(default_factory=lambda: [Scope.ROUTED_EXPERTS.value])
    blocksize: int = 128
    percdamp: float = 0.01
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS
    step: str = "convert"
    version: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_quantize_module_handler(cls)(_binarization_handler)

    def __post_init__(self):
        name = type(self).__name__
        if type(self) is BinarizationConfig:
            raise TypeError("BinarizationConfig is abstract; use MoBiEConfig or a baseline: SignBinaryConfig, "
                            "BiLLMConfig, ARBLLMConfig or HBLLMConfig")
        scope = [self.scope] if isinstance(self.scope, (str, Scope)) else list(self.scope)
        normalized = []
        for s in scope:
            value = s.value if isinstance(s, Scope) else s
            if not isinstance(value, str) or value not in ALL_SCOPES:
                never = isinstance(value, str) and any(value.lower().startswith(n) for n in _NEVER)
                hint = (" (routers, gates, embeddings, norms and lm_head are never binarized)" if never else "")
                raise ValueError(f"{name}.scope: unknown entry {s!r}{hint}; valid entries are {ALL_SCOPES}")
            if value not in normalized:
                normalized.append(value)
        if not normalized:
            raise ValueError(f"{name}.scope: empty; valid entries are {ALL_SCOPES}")
        self.scope = [s for s in ALL_SCOPES if s in normalized]
        _check_int(name, "blocksize", self.blocksize, 1)
        _check_int(name, "min_expert_tokens", self.min_expert_tokens, 1)
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not (0 <= self.percdamp < 1):
            raise ValueError(f"{name}.percdamp must be a float in [0, 1), got {self.percdamp!r}")
        if self.step not in _STEPS:
            raise ValueError(f"{name}.step must be one of {_STEPS}, got {self.step!r}")

    # -- what a method implements ------------------------------------------------------------------

    def binarize_matrix(self, W: torch.Tensor, H: torch.Tensor) -> BinarizedWeight:
        """Binarize one ``[out, in]`` fp32 matrix given its ``[in, in]`` fp32 Hessian."""
        raise NotImplementedError(f"{type(self).__name__} does not implement binarize_matrix")

    def quantize_experts(self, W3d: torch.Tensor, H3d: torch.Tensor, *,
                         context: QuantContext | None = None) -> BinarizedExperts:
        """Binarize all experts of one projection: ``W3d [E, out, in]``, ``H3d [E, in, in]`` (fp32).

        The base implementation binarizes each expert independently with :meth:`binarize_matrix`
        (inputs are cloned: the algorithms may work in place). Override for joint methods.
        """
        self._check_expert_shapes(W3d, H3d)
        out, bits, parts = torch.empty_like(W3d, dtype=torch.float32), BitBudget(), []
        for e in range(W3d.shape[0]):
            res = self.binarize_matrix(W3d[e].float().clone(), H3d[e].float().clone())
            out[e] = res.weight
            bits = bits + res.bits
            parts.append(res.parts)
        return BinarizedExperts(out, bits, parts)

    def _check_expert_shapes(self, W3d: torch.Tensor, H3d: torch.Tensor) -> None:
        if W3d.dim() != 3 or H3d.dim() != 3 or H3d.shape[0] != W3d.shape[0] or H3d.shape[1:] != (W3d.shape[2],) * 2:
            raise ValueError(f"{type(self).__name__}.quantize_experts: expected W3d [E, out, in] and H3d [E, in, in], "
                             f"got {list(W3d.shape)} and {list(H3d.shape)}")

    def quantize_linear(self, W: torch.Tensor, H: torch.Tensor, *,
                        context: QuantContext | None = None) -> BinarizedWeight:
        """Binarize one nn.Linear weight ``[out, in]`` (default: :meth:`binarize_matrix`)."""
        return self.binarize_matrix(W.float().clone(), H.float().clone())


def _check_int(cls_name: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls_name}.{name} must be an int >= {minimum}, got {value!r}")


def _algorithms():
    from . import algorithms

    return algorithms


def _mobie_bits_estimate(E, m, n, side, dtype) -> float:
    """All-inclusive bits per weight of a CEJD projection without second planes: signs, 8-bit row and
    column scale codes with their per-expert grid, and the backbone (input side n×n, output side m×m)
    shared by E experts."""
    from .algorithms.scale_codes import CODE_BITS, GRID_FP16_PER_EXPERT

    scales = (CODE_BITS * (m + n) + 16 * GRID_FP16_PER_EXPERT) / (m * n)
    if side == "none":
        return 1 + scales
    k = m if side == "output" else n
    per = {"bfloat16": 16, "float32": 32, "int8": 8}[dtype]
    return 1 + scales + (per * k * k + (16 * k if dtype == "int8" else 0)) / (E * m * n)


# torchao's config (de)serialization only resolves classes from allow-listed modules.
ALLOWED_AO_MODULES.add(__name__)


# --------------------------------------------------------------------------------------------------
# MoBiE
# --------------------------------------------------------------------------------------------------

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
      Off: the same binary factor is fit on each ``W_e`` directly (no backbone).
    * ``glas`` — global loss-aligned saliency (:mod:`torchao_mobie.calibration.gradients`): one backward
      pass of the full-precision LM loss gives per routed (token, expert) weights
      ``w = mean_j (∂ℓ/∂Z_j)²`` at each expert projection output ``Z``; the Hessians become
      ``(1−λ)·H/tr H + λ·H_w/tr H_w`` (per layer, λ = ``glas_lambda``), used everywhere.
    * ``nges`` — null-space guided expert-shift suppression (:mod:`torchao_mobie.algorithms.nges`):
      ``down_proj`` errors are measured with the output metric ``G = I + μ·P`` (P: routing-sensitive
      directions of the later layers' routers, μ = ``nges_mu``) when fitting scales and backbone, which
      pushes the error into the routers' null space at no storage cost.

    Args (besides :class:`BinarizationConfig`'s):
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
        salient_cols: per expert, input-side factor columns with a second binary plane (largest
            output-error energy); None = as many as the bit budget leaves (at most ``in_features // 2``;
            0 on output-side factors).
        route_weighted: weight each routed token of an expert's Hessian by its squared routing weight
            ``g²`` (``Σ g²·x xᵀ``): the MoE block output is ``Σ g_e·expert_e(x)``, so this is the block's
            output error rather than the expert's own (BiLLM/ARB's per-expert convention). Seed 0
            (benchmarks/results/ablation.md, on vs off): gap 0.0212 vs 0.0234 qwen2moe-32e-shared, 0.0293
            vs 0.0302 qwen3moe-32e, 0.0215 vs 0.0247 olmoe-32e, 0.0337 vs 0.0351 mixtral-8e.
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
        side: backbone side, "auto", "input" or "output" (for every projection). "auto": input side when
            its int8 backbone fits the bit budget (measured on mixtral-8e layer 0 alone: gap 0.067 with the
            output-side down_proj backbone, 0.039 with the input side), else the cheaper side.
        max_bits: cap on all-inclusive bits per expert weight used by the automatic choices (backbone
            side, number of salient columns); None = 1.5 on fine-grained layers (>= 16 experts), 2.2 on
            coarse ones (packed experts <= 14% of bf16). The cap holds per layer: down_proj gets what
            gate_up (2/3 of the weights) leaves.

    Defaults (rounds=2, refine=2, polish=1, scale_rounds=1, percdamp=0.1, glas_lambda=0.5, nges_mu=1) were chosen
    on qwen3moe-32e / mixtral-8e layer and end-to-end measurements (glas_lambda=1.0 was catastrophic:
    gap 0.18 vs 0.04; more rounds/refine lower the calibration error a little and cost time).

    Representation (``BinarizedExperts.parts[e]``, see :func:`torchao_mobie.algorithms.cejd.reconstruct`)::

        Q_e = row_scale[:, None] * (sign * col_scale[None, :] + sign2 * col_scale2[None, :])
        W_hat[e] = backbone_matrix(backbone) @ Q_e    (side "output")
        W_hat[e] = Q_e @ backbone_matrix(backbone)    (side "input")
        W_hat[e] = Q_e                                (side "none": cejd=False)

    signs int8 ±1; scales fp16, decoded from the stored 8-bit log codes (``row_code``, ``col_code``,
    ``col_code2`` with the expert's ``scale_grid [3, 2]``: :mod:`torchao_mobie.algorithms.scale_codes`);
    ``sign2``/``col_scale2`` None or zero outside the salient columns; the
    backbone dict (``blocks [nb, k, k]`` in its stored dtype, ``dtype``, ``scale`` = fp16 per-row scale
    for int8, ``side``) is one object shared by every expert of the projection and counted once in
    ``BitBudget.backbone_bits``; salient-column bitmaps in ``bitmap_bits``.
    """

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
    route_weighted: bool = True
    salient_cols: int | None = None
    max_bits: float | None = None
    percdamp: float = 0.1
    hdamp: float | None = 0.0
    rank_damp: float = 0.01
    side: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        n = "MoBiEConfig"
        for f in ("cejd", "glas", "nges", "route_weighted"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{n}.{f} must be a bool, got {getattr(self, f)!r}")
        if self.side not in ("auto", "input", "output"):
            raise ValueError(f"{n}.side must be 'auto', 'input' or 'output', got {self.side!r}")
        if self.backbone_dtype not in _BACKBONE_DTYPES:
            raise ValueError(f"{n}.backbone_dtype must be one of {_BACKBONE_DTYPES}, got {self.backbone_dtype!r}")
        _check_int(n, "gate_up_blocks", self.gate_up_blocks, 1)
        _check_int(n, "rounds", self.rounds, 1)
        _check_int(n, "scale_rounds", self.scale_rounds, 1)
        _check_int(n, "refine", self.refine, 0)
        _check_int(n, "polish", self.polish, 0)
        if self.hdamp is not None and (isinstance(self.hdamp, bool) or not isinstance(self.hdamp, (int, float))
                                       or self.hdamp < 0):
            raise ValueError(f"{n}.hdamp must be None or a float >= 0, got {self.hdamp!r}")
        if isinstance(self.rank_damp, bool) or not isinstance(self.rank_damp, (int, float)) or self.rank_damp < 0:
            raise ValueError(f"{n}.rank_damp must be a float >= 0, got {self.rank_damp!r}")
        if self.salient_cols is not None:
            _check_int(n, "salient_cols", self.salient_cols, 0)
        if self.glas_samples is not None:
            _check_int(n, "glas_samples", self.glas_samples, 1)
        if isinstance(self.glas_power, bool) or not isinstance(self.glas_power, (int, float)) or not (
                0 < self.glas_power <= 1):
            raise ValueError(f"{n}.glas_power must be a float in (0, 1], got {self.glas_power!r}")
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

    def _hessians(self, H3d, context):
        """Per-expert Hessians in "sum" form (expert usage kept), GLAS-mixed when available."""
        H = H3d.float()
        E = H.shape[0]
        counts = None if context is None else context.token_counts
        if counts is None or (context is not None and context.data_free):
            w = torch.ones(E)
        else:
            w = counts.float().cpu()
            w = w.clamp_min(max(1e-2 * float(w.mean()), 1.0))
        Hs = H * w.to(H.device)[:, None, None]
        Hs = Hs / Hs.diagonal(dim1=-2, dim2=-1).sum().clamp_min(1e-30)
        Hg = None if context is None else getattr(context, "guided_hessian", None)
        if self.glas and Hg is not None and self.glas_lambda > 0:
            Hg = Hg.float().to(H.device)
            Hg = Hg / Hg.diagonal(dim1=-2, dim2=-1).sum().clamp_min(1e-30)
            Hs = (1 - self.glas_lambda) * Hs + self.glas_lambda * Hg
        if self.rank_damp > 0 and counts is not None and not context.data_free:
            singular = (counts < H.shape[-1]).to(Hs.device)  # rank(H_e) <= routed tokens: a ridge bounds the fits
            singular[[e for e in context.fallback_experts if e < E]] = False
            md = Hs[singular].diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
            Hs[singular] += self.rank_damp * md * torch.eye(H.shape[-1], dtype=Hs.dtype, device=Hs.device)
        # floor so every expert's problem stays well posed (experts without routed tokens)
        tr = Hs.diagonal(dim1=-2, dim2=-1).mean(-1)
        floor = 1e-3 * tr.mean()
        low = tr < floor
        if bool(low.any()):
            Hs[low] = Hs[low] + floor * H[low] / H[low].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
        return Hs

    def quantize_experts(self, W3d, H3d, *, context: QuantContext | None = None) -> BinarizedExperts:
        from .algorithms import cejd as C

        W = W3d.float()
        H = self._hessians(H3d, context)
        E, m, n = W.shape
        projection = "weight" if context is None else context.projection
        G = None
        if self.nges and self.nges_mu > 0 and projection == "down_proj" and context is not None:
            routers = getattr(context, "downstream_routers", None)
            if routers:
                from .algorithms.nges import router_metric

                G = router_metric(routers, mu=self.nges_mu, decay=self.nges_decay).to(W.device)
        cap = self.max_bits if self.max_bits is not None else (1.5 if E >= 16 else 2.2)
        if projection == "down_proj" and self.cejd:
            # the budget is per layer: gate_up holds 2/3 of the expert weights; what it leaves goes to down
            g_bits = self._plan(E, 2 * n, m, cap)[3]
            cap = max(cap, 3 * cap - 2 * g_bits - 0.03)
        side, dtype, sal, _ = self._plan(E, m, n, cap)
        blocks = self.gate_up_blocks if (side == "output" and projection == "gate_up_proj") else 1
        kw = dict(side=side, blocks=blocks, G=G, rounds=self.rounds, scale_rounds=self.scale_rounds,
                  percdamp=self.percdamp, salient_cols=sal, refine=self.refine, polish=self.polish,
                  hdamp=self.hdamp if self.hdamp is not None else (1.0 if (E < 16 and side == "input") else 0.0))
        res = C.cejd_quantize(W, H, backbone_dtype=dtype, **kw)
        p = res.parts
        per_expert = ("sign", "row_scale", "col_scale", "sign2", "col_scale2", "row_code", "col_code", "col_code2",
                      "scale_grid")
        parts = [{"side": p["side"], "backbone": p["backbone"],
                  **{k: None if p[k] is None else p[k][e] for k in per_expert}}
                 for e in range(E)]
        return BinarizedExperts(res.weight, res.bits, parts)

    def _plan(self, E, m, n, cap) -> tuple[str, str, int, float]:
        """(side, backbone dtype, salient columns, estimated all-inclusive bits) of one projection.

        Side "auto": the input side (binary factor with GPTQ along the data's input directions and room
        for salient second planes) whenever its int8 backbone fits the budget, else the cheaper side.
        Salient columns spend what the budget leaves (≈ 1/n bit per weight per column), at most n/2
        (qwen3moe-32e down_proj, seed 0: 16 / 24 / 32 columns of 64 give gap 0.0388 / 0.0341 / 0.0302).
        """
        if not self.cejd:
            side = "none"
        elif self.side != "auto":
            side = self.side
        elif _mobie_bits_estimate(E, m, n, "input", "int8") + 0.1 <= cap:
            side = "input"
        else:
            side = "input" if n <= m else "output"
        dtype = "int8" if self.backbone_dtype == "auto" else self.backbone_dtype
        est = _mobie_bits_estimate(E, m, n, side, dtype)
        if self.salient_cols is not None:
            sal = self.salient_cols if side != "output" else 0
        elif side == "output":
            sal = 0
        else:
            sal = max(0, min(n // 2, int((cap - est - 0.02) * n)))
        return side, dtype, sal, est + sal / n

    def binarize_matrix(self, W, H):
        from .algorithms import cejd as C

        n = W.shape[1]
        res = C.cejd_quantize(W.float()[None], H.float()[None], side="none", rounds=1, scale_rounds=self.scale_rounds,
                              percdamp=self.percdamp, refine=self.refine,
                              salient_cols=self.salient_cols if self.salient_cols is not None else n // 16)
        return BinarizedWeight(res.weight[0], res.bits, {k: v for k, v in res.parts.items()})
