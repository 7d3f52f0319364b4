"""Every import-time registration of torchao_mobie, in one place (run by ``import torchao_mobie``).

* transformers: the ``"mobie"`` quantization method (HF quantizer: ``save_pretrained`` /
  ``from_pretrained`` of packed checkpoints) and the ``"mobie"`` experts implementation;
* torchao: the ``quantize_`` handler of every :class:`BinarizationConfig` subclass (later subclasses too),
  and the config modules its (de)serialization may resolve classes from;
* :class:`MoBiETensor`: its aten dispatch table (transformers' generic experts paths), transformers'
  ``grouped_mm_fallback`` op, and ``torch.load(weights_only=True)``'s safe globals.
"""

from __future__ import annotations

import torch
from torchao.core.config import ALLOWED_AO_MODULES
from torchao.quantization.transform_module import register_quantize_module_handler

from . import baselines, config, mobie
from .integrations.experts import MOBIE_EXPERTS, mobie_experts_forward
from .methods import base
from .pipeline.handler import binarize_module
from .storage import hf_quantizer, mobie_ops
from .storage.mobie_tensor import MoBiETensor

__all__ = ["register_all"]


def _register_handler(cls) -> None:
    register_quantize_module_handler(cls)(binarize_module)


def register_all() -> None:
    """Run every registration (idempotent)."""
    import transformers.integrations.moe as moe

    hf_quantizer.register()
    moe.ExpertsInterface.register(MOBIE_EXPERTS, mobie_experts_forward)
    for cls in base.subclasses():
        _register_handler(cls)
    if _register_handler not in base.SUBCLASS_HOOKS:
        base.SUBCLASS_HOOKS.append(_register_handler)
    # torchao's config (de)serialization only resolves classes from allow-listed modules
    ALLOWED_AO_MODULES.update({config.__name__, mobie.__name__, baselines.__name__})
    mobie_ops.register_grouped_mm_fallback()
    torch.serialization.add_safe_globals([MoBiETensor])


register_all()
