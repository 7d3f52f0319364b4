"""Calibration statistics: what the binarizers need to know about the data, one idea per module.

* :mod:`.hessian`: ``Σ w x xᵀ`` accumulators (fp32).
* :mod:`.routing`: routing pairs grouped by expert.
* :mod:`.experts`: per-expert gate_up / down Hessians and token counts from one hook on the experts
  module; layer-level sums (router-input statistics, fallback Hessian).
* :mod:`.fallback`: the rule for experts the data (almost) never reaches, and its log line.
* :mod:`.router`: router-input moments kept for expert-shift suppression (NGES).
* :mod:`.linear`: Hessians of ``nn.Linear`` layers in scope.
* :mod:`.fp_shadow`: the full-precision model's expert inputs, one layer ahead of the sequential pass (for the
  full-precision target, :mod:`torchao_mobie.algorithms.fp_target`).

Gradient statistics (GLAS) are not implemented; they enter through the per-row/per-pair weights that
every accumulator already takes (``pair_weights`` / ``row_weights``): a gradient-aware collector
registers backward hooks, computes squared output gradients per token, and calls ``observe`` with
them, so the quantizers receive ``Σ g² x xᵀ`` in place of ``Σ x xᵀ``.
"""

from .experts import ExpertHessians, ExpertStatsCollector
from .fallback import DEFAULT_MIN_EXPERT_TOKENS, FallbackEvent, log_fallback_summary
from .hessian import HessianAccumulator, add_outer
from .linear import LinearStatsCollector
from .router import RouterInputStats
from .routing import RoutedTokens, route_tokens

__all__ = [
    "DEFAULT_MIN_EXPERT_TOKENS",
    "ExpertHessians",
    "ExpertStatsCollector",
    "FallbackEvent",
    "HessianAccumulator",
    "LinearStatsCollector",
    "RoutedTokens",
    "RouterInputStats",
    "add_outer",
    "log_fallback_summary",
    "route_tokens",
]
