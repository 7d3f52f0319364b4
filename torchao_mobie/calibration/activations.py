"""Where calibration activations live between layers: memory up to a size rule, then disk.

Layer-wise passes (layer-wise GLAS, streaming quantization) keep activations per decoder-layer boundary:
``[h per calibration batch]`` for each stored level. The rule: a level stays where it was produced (the
device, or CPU memory) while everything held in memory stays within ``budget`` bytes
(``MOBIE_ACTIVATION_BYTES``, default :data:`ACTIVATION_BYTES`); a level that would pass it is written to
a temporary directory (one safetensors file per level) and read back to its device when asked for. Each
level is ``calibration tokens × hidden × dtype`` bytes (128×2048 tokens of a 2048-wide model in fp32:
2 GiB), so layer-wise GLAS's ``L + 1`` levels go to disk on deep models and a streaming pass's single
level does not.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

__all__ = ["ACTIVATION_BYTES", "ActivationStore", "activation_budget"]

ACTIVATION_BYTES = 8 * 2**30


def activation_budget() -> int:
    env = os.environ.get("MOBIE_ACTIVATION_BYTES")
    return int(env) if env else ACTIVATION_BYTES


class ActivationStore:
    """Levels of per-batch activations, in memory within ``budget`` bytes, on disk beyond it."""

    def __init__(self, budget: int | None = None, directory: str | None = None):
        self.budget = activation_budget() if budget is None else budget
        self.directory = directory
        self._mem: dict[int, list] = {}
        self._disk: dict[int, tuple[str, list]] = {}
        self._tmp = None
        self.held = 0  # bytes in memory
        self.peak = 0
        self.spilled = 0  # bytes written to disk

    def put(self, level: int, tensors: list) -> None:
        self.drop(level)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.held + size <= self.budget:
            self._mem[level] = list(tensors)
            self.held += size
            self.peak = max(self.peak, self.held)
            return
        from safetensors.torch import save_file

        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="mobie-act-", dir=self.directory)
        path = os.path.join(self._tmp, f"level{level}.safetensors")
        save_file({str(b): t.detach().contiguous().cpu() for b, t in enumerate(tensors)}, path)
        self._disk[level] = (path, [t.device for t in tensors])
        self.spilled += size

    def get(self, level: int) -> list:
        if level in self._mem:
            return self._mem[level]
        from safetensors.torch import load_file

        path, devices = self._disk[level]
        data = load_file(path)
        return [data[str(b)].to(d) for b, d in enumerate(devices)]

    def drop(self, level: int) -> None:
        if level in self._mem:
            self.held -= sum(t.numel() * t.element_size() for t in self._mem.pop(level))
        if level in self._disk:
            os.remove(self._disk.pop(level)[0])

    def close(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self.held = 0
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
