"""torchao_mobie: 1-bit post-training quantization of Mixture-of-Experts LLMs, a torchao-style backend.

Quick start::

    from torchao_mobie import ARBLLMConfig, quantize_model
    report = quantize_model(model, ARBLLMConfig(), calibration_ids)   # sequential, calibrated
    print(report.summary())

torchao-native::

    from dataclasses import replace
    import torchao_mobie
    cfg = torchao_mobie.BiLLMConfig()
    torchao_mobie.quantize_(model, replace(cfg, step="observe"))
    for batch in calibration: model(batch)
    torchao_mobie.quantize_(model, cfg)                               # step="convert"
"""

from importlib.metadata import PackageNotFoundError, version as _dist_version

from . import registrations  # noqa: F401  (HF quantizer, experts implementation, torchao handlers: one module)
from .config import ARBLLMConfig, BiLLMConfig, BinarizationConfig, HBLLMConfig, MoBiEConfig, Scope, SignBinaryConfig
from .pipeline import QuantizationReport, moe_experts_filter, quantize_, quantize_model

try:
    __version__ = _dist_version("torchao_mobie")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.1.0+source"

__all__ = [
    "__version__",
    "ARBLLMConfig",
    "BiLLMConfig",
    "BinarizationConfig",
    "HBLLMConfig",
    "MoBiEConfig",
    "QuantizationReport",
    "Scope",
    "SignBinaryConfig",
    "moe_experts_filter",
    "quantize_",
    "quantize_model",
]
