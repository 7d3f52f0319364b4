"""The record of quantization runs written into ``model.config`` (config.json).

Per-module records are lost by ``save_pretrained``; this entry is saved, so a reloaded fake-quant checkpoint
is still recognized as binarized (and refused for a second binarization), and a packed one says so.
"""

from __future__ import annotations

__all__ = ["MARKER", "mark_quantized", "mark_packed", "quantization_marker"]

#: ``model.config`` key listing the quantization runs applied to a model
MARKER = "torchao_mobie"


def quantization_marker(model) -> list[dict]:
    """The quantization runs recorded in ``model.config`` (``[]`` for a model never quantized)."""
    entries = getattr(getattr(model, "config", None), MARKER, None)
    return [dict(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def mark_quantized(model, config, storage: str = "fake-quant") -> None:
    """Append a run of ``config`` (its class name and scope) to the model's marker."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    entries = quantization_marker(model)
    entries.append({"config": type(config).__name__, "scope": list(config.scope), "storage": storage})
    setattr(cfg, MARKER, entries)


def mark_packed(model) -> None:
    """Every recorded run that binarized the routed experts now says ``storage="packed"``."""
    entries = quantization_marker(model)
    if entries and hasattr(model, "config"):
        setattr(model.config, MARKER, [dict(e, storage="packed") if "routed_experts" in e.get("scope", ()) else e
                                       for e in entries])
