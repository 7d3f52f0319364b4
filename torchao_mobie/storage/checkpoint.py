"""A packed model as one safetensors file beside its ``config.json``, without ``from_pretrained``
(:func:`save_quantized` / :func:`load_quantized`); the format is :mod:`.serialization`'s."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .hf_quantizer import attach_quantizer, set_experts_implementation
from .mobie_tensor import MoBiETensor
from .serialization import WEIGHTS_NAME, MoBiECheckpointError, _split, flatten_state_dict, read_checkpoint

__all__ = ["load_quantized", "load_state_dict_packed", "save_quantized"]


def save_quantized(model: nn.Module, save_directory: str) -> str:
    """Write a packed model: ``config.json`` (with the ``"mobie"`` quantization config) + ``model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    if hasattr(model, "config"):
        attach_quantizer(model)
        model.config.save_pretrained(save_directory)
    tensors, meta = flatten_state_dict(model.state_dict())
    path = os.path.join(save_directory, WEIGHTS_NAME)
    save_file(tensors, path, metadata=meta)
    return path


def load_quantized(save_directory: str, *, experts_implementation: str = "mobie") -> nn.Module:
    """Rebuild a model written by :func:`save_quantized` (transformers model classes from ``config.json``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(save_directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise MoBiECheckpointError(f"{path}: no such file")
    state = read_checkpoint(path)
    config = AutoConfig.from_pretrained(save_directory)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    load_state_dict_packed(model, state, path)
    set_experts_implementation(model, experts_implementation)
    attach_quantizer(model)
    return model.eval()


@torch.no_grad()
def load_state_dict_packed(model: nn.Module, state: Mapping[str, torch.Tensor], filename: str = "<checkpoint>") -> None:
    """Load ``state`` into ``model``: packed entries replace their parameters, plain ones are copied."""
    plain = {}
    expected = set(model.state_dict().keys())
    for k, v in state.items():
        if k not in expected:
            raise MoBiECheckpointError(f"{filename}: tensor {k} does not belong to {type(model).__name__}")
        if isinstance(v, MoBiETensor):
            mod_name, p = _split(k)
            mod = model.get_submodule(mod_name)
            old = getattr(mod, p)
            if tuple(old.shape) != tuple(v.shape):
                raise MoBiECheckpointError(f"{filename}: packed parameter {k} is {list(v.shape)}, the model expects "
                                           f"{list(old.shape)}")
            setattr(mod, p, nn.Parameter(v.to(old.device), requires_grad=False))
        else:
            plain[k] = v
    missing = sorted(expected - set(state))
    if missing:
        raise MoBiECheckpointError(f"{filename}: tensor {missing[0]} is missing from the checkpoint")
    result = model.load_state_dict(plain, strict=False)
    bad = [k for k in result.unexpected_keys]
    if bad:
        raise MoBiECheckpointError(f"{filename}: unexpected tensor {bad[0]}")
