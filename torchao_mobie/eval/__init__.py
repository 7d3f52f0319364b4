"""Evaluation harness: perplexity, expert shift and KL against full precision, lm-eval tasks."""

from .metrics import (
    ComparisonResult,
    ExpertShift,
    compare_models,
    log_ppl_gap,
    perplexity,
    unigram_perplexity,
)

__all__ = ["ComparisonResult", "ExpertShift", "compare_models", "log_ppl_gap", "perplexity", "unigram_perplexity"]
