"""Reading a Hugging Face checkpoint directory a few parameters at a time, as ``from_pretrained`` would load them.

A hub checkpoint is one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, in the
family's original key layout (e.g. Mixtral's ``block_sparse_moe.experts.N.w1.weight``). transformers 5
converts those keys on load with the model's conversion mapping (renamings, then per-expert tensors merged
into the fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``). :class:`HubCheckpoint` plans that
conversion once for every key (transformers' own :func:`~transformers.core_model_loading.rename_source_key`
and the model's :func:`~transformers.conversion_mapping.get_model_conversion_mapping`, so no key table of
ours) and then materializes only the parameters asked for, reading each source tensor from its shard
(``safe_open``: memory-mapped, one tensor copied at a time) and running transformers' converter operations
on them, in the order and dtype ``from_pretrained`` uses. Streaming quantization
(:mod:`~torchao_mobie.pipeline.streaming`) loads one decoder layer at a time with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from copy import deepcopy
from pathlib import Path

import torch

__all__ = ["DTYPE_BYTES", "FLOAT_DTYPES", "HubCheckpoint", "checkpoint_files", "tensor_sizes"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def tensor_sizes(paths):
    """``(safetensors dtype, element count)`` of every tensor in the files, read from their headers."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                yield sl.get_dtype(), math.prod(sl.get_shape())


def checkpoint_files(model_dir) -> dict[str, str]:
    """``{checkpoint key: shard path}`` of a hub checkpoint directory (sharded or one file)."""
    d = Path(model_dir)
    if (d / INDEX_NAME).is_file():
        weight_map = json.loads((d / INDEX_NAME).read_text())["weight_map"]
        return {k: str(d / f) for k, f in weight_map.items()}
    if (d / SINGLE_NAME).is_file():
        from safetensors import safe_open

        with safe_open(str(d / SINGLE_NAME), framework="pt") as f:
            return {k: str(d / SINGLE_NAME) for k in f.keys()}
    raise FileNotFoundError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME} (streaming reads safetensors checkpoints)")


class HubCheckpoint:
    """The tensors of a checkpoint directory, converted to the names and dtypes of ``model`` (a meta skeleton
    of the model class ``from_pretrained`` would build)."""

    def __init__(self, model_dir, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model_dir = Path(model_dir)
        self.model = model
        self.files = checkpoint_files(model_dir)
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.meta = model.state_dict(keep_vars=True)
        prefix = getattr(model, "base_model_prefix", None)
        # target name -> (converter template or None, [(source pattern, checkpoint key)]), keys in the natural
        # order transformers collects them in (experts 0, 1, ..., 10, not 0, 1, 10)
        self.plan: dict[str, tuple] = {}
        for key in sorted(self.files, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, self.meta)
            if target not in self.meta and key in self.meta:
                target, pattern = rename_source_key(key, [], [], prefix, self.meta)
            if target not in self.meta:
                continue  # not a parameter of this model (transformers reports it as unexpected)
            conv, sources = self.plan.setdefault(target, (by_pattern.get(pattern), []))
            sources.append((pattern if pattern is not None else key, key))
        self._open: dict[str, object] = {}

    def targets(self, prefix: str = "") -> list[str]:
        return [k for k in self.plan if k.startswith(prefix)]

    def _read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        f = self._open.get(path)
        if f is None:
            f = self._open[path] = safe_open(path, framework="pt")
        return f.get_tensor(key).to(dtype=dtype)

    def load(self, names) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for the model's parameter/buffer ``names``, converted as on load (the shards are
        closed again afterwards: their mapped pages would otherwise stay resident as the run goes deeper)."""
        try:
            return self._load(names)
        finally:
            self._open.clear()

    def _load(self, names) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if name not in self.plan:
                raise KeyError(f"{self.model_dir}: no checkpoint tensor for {name}")
            template, sources = self.plan[name]
            dtype = self.meta[name].dtype
            if template is None:
                out[name] = self._read(sources[0][1], dtype)
                continue
            conv = deepcopy(template)
            for pattern, key in sources:
                conv.add_tensor(name, key, pattern, lambda key=key: self._read(key, dtype))
            for target, value in conv.convert(name, model=self.model, config=self.model.config).items():
                if target in names or target == name:
                    out[target] = value[0] if isinstance(value, list) else value
        return out

    def close(self) -> None:
        self._open.clear()

    def fingerprint(self) -> str:
        """sha256 over the checkpoint's config, keys, shard names and sizes (identifies the input of a resume)."""
        h = hashlib.sha256()
        cfg = self.model_dir / "config.json"
        h.update(cfg.read_bytes() if cfg.is_file() else b"")
        for key in sorted(self.files):
            p = self.files[key]
            h.update(f"{key}\0{os.path.basename(p)}\0{os.path.getsize(p)}\n".encode())
        return h.hexdigest()
