"""``"mobie_sdpa"``: transformers' SDPA attention, with grouped-query decode steps run on the key/value heads.

Why: on the CPU, PyTorch's flash kernel for bf16 spends a fixed cost per (batch, head) on every call. At a
decode step (one query token) with grouped-query attention, transformers calls it with all query heads
(``enable_gqa`` or ``repeat_kv``; its own packing of the query onto the key/value heads is off under
``torch.compile``). Measured with 2 threads, bf16, 32 query / 4 KV heads of 128 and 160 cached tokens:
about 560 us per call, against about 40 us with the ``n_rep`` query heads of each KV head stacked as
``n_rep`` query rows (``benchmarks/cpu_decode.py`` records the end-to-end effect). The softmax over each
query row is the same either way; only the arithmetic grouping changes.

Used by ``torchao-mobie bench`` and ``benchmarks/cpu_decode.py`` on the CPU, for the packed and the bf16
model alike, through :func:`use_decode_attention`. Everything it does not cover (prefill, masks that differ
per head, attention sinks, non-GQA models) goes to transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["MOBIE_SDPA", "mobie_sdpa_forward", "use_decode_attention"]

MOBIE_SDPA = "mobie_sdpa"


def _packable(module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> bool:
    n_rep = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or n_rep <= 1 or query.shape[1] != key.shape[1] * n_rep:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return False
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
        return False
    return attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)


def mobie_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                       dropout: float = 0.0, scaling: float | None = None, is_causal=None, **kwargs):
    """transformers' attention-function signature: ``query [b, h, q, d]``, ``key/value [b, kv, s, d]`` ->
    ``(output [b, q, h, d], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _packable(module, query, key, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, h, _, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, h // kv, d)  # the query heads of one KV head become its query rows
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        is_causal=False)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(MOBIE_SDPA, mobie_sdpa_forward)


def use_decode_attention(model) -> str | None:
    """Switch ``model`` from ``"sdpa"`` to ``"mobie_sdpa"`` in place; returns the previous implementation, or
    ``None`` (and changes nothing) when the model does not use ``"sdpa"``."""
    cfg = getattr(model, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if prev != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    register()
    model.set_attn_implementation(MOBIE_SDPA)
    return prev
