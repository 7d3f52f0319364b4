"""Every binarization config in one place (the import path serialized configs use).

Each config is usable three ways:

* ``torchao_mobie.quantize_model(model, cfg, calibration)``: sequential (GPTQ-order) calibration;
* ``torchao_mobie.quantize_(model, cfg)`` / ``torchao.quantize_(model, cfg, filter_fn=moe_experts_filter)``
  / ``FqnToConfig({r"re:.*\\.experts\\.gate_up_proj": cfg, ...})``: torchao-native, with
  ``step="observe"`` then ``step="convert"`` (or ``convert`` alone = data-free);
* directly: ``cfg.quantize_experts(W3d, H3d)`` / ``cfg.binarize_matrix(W, H)``.

The base class and the pipeline/method interface are :mod:`torchao_mobie.methods.base`; MoBiE's config is
:mod:`torchao_mobie.mobie`, the baselines' :mod:`torchao_mobie.baselines`.
"""

from .baselines import ARBLLMConfig, BiLLMConfig, HBLLMConfig, SignBinaryConfig
from .methods.base import ALL_SCOPES, BinarizationConfig, BinarizedExperts, QuantContext, Scope
from .mobie import MoBiEConfig

__all__ = ["ALL_SCOPES", "ARBLLMConfig", "BiLLMConfig", "BinarizationConfig", "BinarizedExperts", "HBLLMConfig",
           "MoBiEConfig", "QuantContext", "Scope", "SignBinaryConfig"]
