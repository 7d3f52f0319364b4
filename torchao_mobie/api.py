"""The public API under its old import path (``from torchao_mobie.api import quantize_model``); it lives in
:mod:`torchao_mobie.pipeline`."""

from .marker import MARKER, quantization_marker
from .pipeline import (
    BinarizationRecord,
    QuantizationReport,
    binarize_module,
    moe_experts_filter,
    quantize_,
    quantize_model,
    scope_filter,
)

__all__ = ["MARKER", "BinarizationRecord", "QuantizationReport", "binarize_module", "moe_experts_filter", "quantize_",
           "quantize_model", "quantization_marker", "scope_filter"]
