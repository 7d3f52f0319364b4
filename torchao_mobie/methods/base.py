"""What every binarization method shares: the config base class, its scope, and what the pipeline hands a
method (:class:`QuantContext`) and gets back (:class:`BinarizedExperts`).

Configs are plain dataclasses with validation; :meth:`BinarizationConfig.quantize_experts` receives a whole
``[E, out, in]`` projection and its per-expert Hessians ``[E, in, in]`` at once, so methods that couple
experts (MoBiE's joint decomposition) override it; the base implementation loops over experts with
:meth:`~BinarizationConfig.binarize_matrix`. Nothing here knows the pipeline: the torchao ``quantize_``
handler is registered for every subclass by :mod:`torchao_mobie.registrations`.

Bit conventions (:class:`~torchao_mobie.algorithms.BitBudget`): ``paper_bits`` counts sign planes and
bitmaps per weight (the BiLLM / ARB-LLM papers' ~1.1 bits); ``all_inclusive_bits`` adds every stored
scale, mean and shared backbone value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torchao.core.config import AOBaseConfig

from ..algorithms.factors import CEJDFactors
from ..algorithms.result import BinarizedWeight, BitBudget
from ..calibration.fallback import DEFAULT_MIN_EXPERT_TOKENS
from ..calibration.router import RouterInputStats

__all__ = ["Scope", "ALL_SCOPES", "BinarizedExperts", "QuantContext", "BinarizationConfig", "subclasses"]

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

    weight: ``[E, out, in]`` fp32 dequantized weights; bits: summed over experts; factors: the stored
    form of the projection (:class:`~torchao_mobie.algorithms.factors.CEJDFactors`) when the method has a
    packed format, else None.
    """

    weight: torch.Tensor
    bits: BitBudget
    factors: CEJDFactors | None = None


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
    downstream_routers: ``[(W_router·diag(γ) [E', H], centered), ...]`` (``centered``: softmax routing) of the
        routers of the following MoE layers, nearest first (for NGES on down_proj).
    calibration_split: ``(mean Hessians [E, in, in], counts [E])`` of the calibration sequences that were
        not held back, when the config asked for held-back sequences (``needs_heldback``).
    judge: ``W_hat [E, out, in] -> float``, the LM loss of the held-back calibration sequences with ``W_hat``
        in place of this projection (:mod:`torchao_mobie.calibration.heldback`), or None.
    sibling_bits: all-inclusive bits per weight of the module's gate_up_proj when down_proj comes after it
        (a layer-level bit budget is shared).
    plan_memory: a dict shared by every call of one sequential pass, for choices that carry over layers.
    fit_weight: the weight the candidate fits on ``calibration_split`` approximate, when it is not the one
        passed (the full-precision target over the tokens not held back; the passed one is over every token).
    """

    name: str = ""
    projection: str = "weight"
    data_free: bool = False
    token_counts: torch.Tensor | None = None
    fallback_experts: list[int] = field(default_factory=list)
    router_stats: RouterInputStats | None = None
    guided_hessian: torch.Tensor | None = None
    downstream_routers: list = field(default_factory=list)
    calibration_split: tuple | None = None
    judge: object | None = None
    sibling_bits: float | None = None
    plan_memory: dict | None = None
    fit_weight: torch.Tensor | None = None


#: called with every new BinarizationConfig subclass (torchao_mobie.registrations adds its torchao handler)
SUBCLASS_HOOKS: list = []


def subclasses(cls=None) -> list[type]:
    """Every (indirect) subclass of ``cls`` (default: :class:`BinarizationConfig`) defined so far."""
    out = []
    for sub in (cls or BinarizationConfig).__subclasses__():
        out += [sub, *subclasses(sub)]
    return out


@dataclass
class BinarizationConfig(AOBaseConfig):
    """Common fields of every binarization method (abstract: use a subclass).

    The baselines (:mod:`torchao_mobie.baselines`) are **fake-quant**: the dequantized binary weights are
    written back into the original parameters in their original dtype, so nothing is saved in memory; the
    storage a packed format would need is reported as a :class:`~torchao_mobie.algorithms.BitBudget`.
    :class:`~torchao_mobie.mobie.MoBiEConfig` packs its routed experts (``packed=True``, the default).

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

    needs_heldback = False  # the pipeline holds calibration sequences back to judge choices (QuantContext.judge)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for hook in SUBCLASS_HOOKS:
            hook(cls)

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
        check_int(name, "blocksize", self.blocksize, 1)
        check_int(name, "min_expert_tokens", self.min_expert_tokens, 1)
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
        (inputs are cloned: the algorithms may work in place). Override for joint methods. Per-expert
        factors without a backbone are joined into the projection's factors; anything else has none.
        """
        self._check_expert_shapes(W3d, H3d)
        out, bits, factors = torch.empty_like(W3d, dtype=torch.float32), BitBudget(), []
        for e in range(W3d.shape[0]):
            res = self.binarize_matrix(W3d[e].float().clone(), H3d[e].float().clone())
            out[e] = res.weight
            bits = bits + res.bits
            factors.append(res.factors)
        joinable = all(isinstance(f, CEJDFactors) and f.backbone is None for f in factors)
        return BinarizedExperts(out, bits, CEJDFactors.cat(factors) if factors and joinable else None)

    def _check_expert_shapes(self, W3d: torch.Tensor, H3d: torch.Tensor) -> None:
        if W3d.dim() != 3 or H3d.dim() != 3 or H3d.shape[0] != W3d.shape[0] or H3d.shape[1:] != (W3d.shape[2],) * 2:
            raise ValueError(f"{type(self).__name__}.quantize_experts: expected W3d [E, out, in] and H3d [E, in, in], "
                             f"got {list(W3d.shape)} and {list(H3d.shape)}")

    def quantize_linear(self, W: torch.Tensor, H: torch.Tensor, *,
                        context: QuantContext | None = None) -> BinarizedWeight:
        """Binarize one nn.Linear weight ``[out, in]`` (default: :meth:`binarize_matrix`)."""
        return self.binarize_matrix(W.float().clone(), H.float().clone())


def check_int(cls_name: str, name: str, value, minimum: int) -> None:
    """A config field that must be an int >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls_name}.{name} must be an int >= {minimum}, got {value!r}")
