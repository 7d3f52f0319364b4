"""Prefill and decode throughput of a causal LM (quick, for the ``bench`` command and comparisons).

Tokens per second depend on everything around the weights (threads, dtype, experts implementation,
batch), so the result carries the settings it was measured with; compare only figures measured on the
same machine in one session.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["compiled_for_bench", "throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_for_bench(model, device: torch.device, compile: bool | None = None):
    """``(model or torch.compile(model), compiled, note)``; ``compile=None``: on for the CPU, where packed MoBiE
    experts then run the fused kernels of :mod:`torchao_mobie.kernels.cpu` (the deployed path), off elsewhere."""
    from ..kernels import cpu, cpu_ext

    on = compile if compile is not None else device.type == "cpu"
    ext = device.type == "cpu" and cpu.cpu_enabled() and cpu_ext.ext_available()
    signs = ("the C++ sign products of kernels/csrc (AVX-512)" if ext else
             f"inductor's fused sign loop (C++ sign products unused: {cpu_ext.ext_error()})")
    if not on:
        return model, False, ("torch.compile: off (eager; packed experts run " +
                              (f"the CPU kernels with {signs})" if ext else "the reference op)"))
    if device.type != "cpu":
        note = "torch.compile: on (inductor)"
    elif cpu.cpu_enabled():
        note = f"torch.compile: on (inductor; packed experts run torchao_mobie.kernels.cpu with {signs})"
    else:
        note = ("torch.compile: on; the fused CPU kernels are off (no C++ compiler, or MOBIE_CPU_KERNEL=0), packed "
                "experts run the reference op")
    return torch.compile(model), True, note


def _cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.x renamed it; the old name goes through a deprecation wrapper that makes
    ``torch.compile`` recompile) or ``past_key_values``."""
    import inspect

    fwd = getattr(model, "_orig_mod", model).forward
    try:
        return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
    except (TypeError, ValueError):  # pragma: no cover - unusual forward
        return "past_key_values"


@torch.inference_mode()
def throughput(model, *, prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1, iters: int = 3,
               warmup: int = 1, seed: int = 0) -> dict:
    """Median prefill and decode tokens/s over ``iters`` runs (after ``warmup``), greedy with a KV cache.

    Prefill: one forward of ``batch_size x prompt_len`` random token ids; decode: ``new_tokens`` single-token
    steps on the cache that prefill built (so decode excludes prefill). Random ids, because routing and
    therefore MoE speed barely depend on the text while loading a corpus would dominate a quick benchmark.
    """
    for name, v, lo in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch_size", batch_size, 1),
                        ("iters", iters, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and prompt_len + new_tokens > max_pos:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context "
                         f"(config.max_position_embeddings={max_pos})")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)
    was_training = model.training
    model.eval()
    cache_kw = _cache_kwarg(model)
    prefill, decode = [], []
    try:
        for i in range(warmup + iters):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            t1 = time.perf_counter()
            past, tok = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=tok, use_cache=True, **{cache_kw: past})
                past, tok = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                prefill.append(t1 - t0)
                decode.append(t2 - t1)
    finally:
        model.train(was_training)
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"prefill_tokens_per_s": batch_size * prompt_len / p, "decode_tokens_per_s": batch_size * new_tokens / d,
            "prefill_s": p, "decode_s": d, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "batch_size": batch_size, "iters": iters, "warmup": warmup, "device": str(device),
            "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "experts_implementation": getattr(getattr(model, "config", None), "_experts_implementation", None),
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)}
