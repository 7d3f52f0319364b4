"""Binarizing a model: the sequential calibrated pipeline (:func:`quantize_model`, :mod:`.sequential`) and the
torchao-native flow (:func:`quantize_`, the ``quantize_`` handler :func:`binarize_module`, :mod:`.handler`).

``quantize_model(model, config, calibration)``: layer by layer in GPTQ order, each stage's statistics from
the outputs of the stages already binarized. ``torchao_mobie.quantize_`` / ``torchao.quantize_`` +
:func:`moe_experts_filter` or ``FqnToConfig``: ``step="observe"`` installs statistics hooks, the user runs
calibration batches, ``step="convert"`` binarizes from them (data-free without observation).
Shared: one parameter at a time (:mod:`.binarize`), the checks made before any weight changes
(:mod:`.guards`), calibration batches (:mod:`.batches`) and what a run leaves behind (:mod:`.report`).
"""

from .handler import binarize_module, moe_experts_filter, quantize_, scope_filter
from .report import BinarizationRecord, QuantizationReport
from .sequential import quantize_model

__all__ = ["BinarizationRecord", "QuantizationReport", "binarize_module", "moe_experts_filter", "quantize_",
           "quantize_model", "scope_filter"]
