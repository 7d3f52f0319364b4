"""What a streaming run commits to its output directory, so that a rerun resumes it (or refuses to).

Layout of ``--out`` while a run is in progress::

    mobie_stream.json                      the manifest: the settings and their sha256, layers done, ...
    model-000NN-of-000MM.safetensors       one shard per finished decoder layer (shard 1: the rest, at the end)
    .mobie_stream/hidden-000II.safetensors the activations entering the next layer, after layer II
    .mobie_stream/glas.safetensors         the GLAS pair weights (computed once, on the full-precision model)

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX), and the manifest is written last: a layer is done exactly when the
manifest says so. A rerun with the same settings continues after the last layer done, from its saved
activations and plan memory, and so writes the same bytes as an uninterrupted run; with other settings
(:func:`settings_of`, anything that can change a byte) it stops with :class:`StreamResumeError` naming the
settings that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from .. import workers

__all__ = ["MANIFEST", "STATE_DIR", "StreamResumeError", "StreamState", "atomic_write_bytes", "atomic_save_file",
           "calibration_digest", "settings_of"]

MANIFEST = "mobie_stream.json"
STATE_DIR = ".mobie_stream"
FORMAT = "mobie-stream"
VERSION = 1


class StreamResumeError(RuntimeError):
    """The output directory holds a streaming run that this one cannot continue."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file whose bytes depend only on its content: safetensors' own layout of the data, with
    the JSON header re-serialized with sorted keys (safetensors writes its metadata map in a random order,
    so two saves of the same tensors differ, and a resumed run could not match an uninterrupted one)."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """:func:`safetensors_bytes` written to a temporary name, then ``os.replace``."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def calibration_digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask):
            if t is None:
                h.update(b"none")
            else:
                h.update(f"{t.dtype}{list(t.shape)}{int(b.heldback)}".encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _config_dict(config) -> dict:
    out = {"class": type(config).__name__}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, (tuple, set)) else v
    return json.loads(json.dumps(out, default=str))


def settings_of(config, *, checkpoint: str, calibration: str, **options) -> dict:
    """Everything that can change the output's bytes: the method's config (every field), the input
    checkpoint's fingerprint, the calibration batches, the run options, and the library versions."""
    import transformers

    from .. import __version__

    return {"config": _config_dict(config), "checkpoint": checkpoint, "calibration": calibration,
            "options": json.loads(json.dumps(options, default=str)),
            "versions": {"torchao_mobie": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class StreamState:
    """The manifest and saved state of one output directory (see the module docstring)."""

    def __init__(self, out: Path, settings: dict, num_layers: int, writer: bool = True):
        self.out = Path(out)
        # with workers (torchao_mobie.workers) only rank 0 writes; the others keep the manifest in memory
        self.writer = writer
        self.state_dir = self.out / STATE_DIR
        self.settings = settings
        self.digest = _digest(settings)
        self.num_layers = num_layers
        self.manifest = {"format": FORMAT, "version": VERSION, "settings_sha256": self.digest, "settings": settings,
                         "num_layers": num_layers, "layers_done": 0, "complete": False, "shards": {},
                         "parameters": {}, "plan_memory": {}}

    def open(self) -> int:
        """Create the directory or check the run it holds; returns the layers already done. With workers, the
        other ranks read what rank 0 found or created, once it has."""
        if not self.writer:
            workers.barrier()
            self.manifest = json.loads((self.out / MANIFEST).read_text())
            return int(self.manifest["layers_done"])
        done = self._open()
        workers.barrier()
        return done

    def _open(self) -> int:
        path = self.out / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("format") != FORMAT:
                raise StreamResumeError(f"{path}: not a torchao_mobie streaming manifest")
            if old.get("settings_sha256") != self.digest:
                diff = _differences(old.get("settings", {}), self.settings)
                raise StreamResumeError(
                    f"{self.out}: holds a streaming run with other settings (settings sha256 "
                    f"{old.get('settings_sha256', '?')[:12]} vs {self.digest[:12]}: {'; '.join(diff) or 'unknown'}); "
                    "resuming would mix two quantizations. Rerun with the same settings, or use a new --out")
            self.manifest = old
            return int(old["layers_done"])
        if self.out.exists() and any(p.name != STATE_DIR for p in self.out.iterdir()):
            raise StreamResumeError(f"{self.out}: exists, is not empty and holds no {MANIFEST}; streaming writes into "
                                    "a new or empty directory (or resumes its own run)")
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        return 0

    def _write_manifest(self) -> None:
        if not self.writer:
            return
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())

    # --- per-layer commit --------------------------------------------------------------------------------
    def hidden_path(self, layer: int) -> Path:
        return self.state_dir / f"hidden-{layer:05d}.safetensors"

    def commit_layer(self, layer: int, shard: str, keys: list[str], hidden: list, parameters: dict,
                     plan_memory: dict) -> None:
        """Layer ``layer`` is done: its shard is written; save the activations it produced, then the manifest."""
        if self.writer:
            self.state_dir.mkdir(exist_ok=True)
            atomic_save_file({str(b): h.detach().contiguous().cpu() for b, h in enumerate(hidden)},
                             self.hidden_path(layer))
        m = self.manifest
        m["layers_done"] = layer + 1
        m["shards"][shard] = keys
        m["parameters"].update(parameters)
        m["plan_memory"] = {p: {"probed": v["probed"], "won": sorted(v["won"])} for p, v in plan_memory.items()}
        self._write_manifest()
        if self.writer and layer > 0 and self.hidden_path(layer - 1).exists():
            os.remove(self.hidden_path(layer - 1))

    def resume_hidden(self, devices) -> list:
        from safetensors.torch import load_file

        data = load_file(str(self.hidden_path(self.manifest["layers_done"] - 1)))
        return [data[str(b)].to(d) for b, d in enumerate(devices)]

    def plan_memory(self) -> dict:
        return {p: {"probed": v["probed"], "won": set(v["won"])} for p, v in self.manifest["plan_memory"].items()}

    # --- GLAS -------------------------------------------------------------------------------------------------
    def save_glas(self, glas) -> None:
        if not self.writer:
            return
        self.state_dir.mkdir(exist_ok=True)
        tensors, order = {}, []
        for fqn in glas.index:
            order.append(fqn)
            for kind, src in (("index", glas.index), ("gate_up", glas.gate_up), ("down", glas.down)):
                for b, t in enumerate(src[fqn]):
                    tensors[f"{fqn}|{kind}|{b}"] = t.contiguous()
        atomic_save_file(tensors, self.state_dir / "glas.safetensors", {"order": json.dumps(order)})

    def load_glas(self):
        from safetensors import safe_open

        from ..calibration.gradients import GLASWeights

        path = self.state_dir / "glas.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            order = json.loads(f.metadata()["order"])
            data = {k: f.get_tensor(k) for k in f.keys()}
        out = []
        for kind in ("index", "gate_up", "down"):
            out.append({fqn: [data[f"{fqn}|{kind}|{b}"] for b in range(sum(1 for k in data
                                                                            if k.startswith(f"{fqn}|{kind}|")))]
                        for fqn in order})
        return GLASWeights(*out)

    # --- finish ---------------------------------------------------------------------------------------------
    def finish(self, shard: str, keys: list[str]) -> None:
        import shutil

        self.manifest["shards"][shard] = keys
        self.manifest["complete"] = True
        self._write_manifest()
        if self.writer:
            shutil.rmtree(self.state_dir, ignore_errors=True)
