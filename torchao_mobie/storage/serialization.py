"""Safetensors format of packed models (also what the ``"mobie"`` HF quantizer reads and writes).

A packed parameter ``<module>.<param>`` is stored as plain tensors ``<module>._<param>_<data name>``
(torchao's naming: ``model.layers.0.mlp.experts._gate_up_proj_qdata``) and described in the file's
string metadata:

* ``mobie_format`` = ``"mobie-packed"``, ``mobie_format_version`` = ``"2"``, or ``"3"`` when the file holds a
  transposed parameter (:func:`format_version`; version 1, with fp16 scales, is read too);
* ``mobie_tensors``: JSON ``{param fqn: {"shape": [E, m, n], "dtype": "bfloat16", "side": "output",
  "data": [data names]}}``, plus ``"transposed": true`` (version 3) for the parameter of a transposed
  experts layout (gpt_oss, llama4: ``shape`` is the parameter's ``[E, in, out]``, the stored data stays in
  the ``[E, out, in]`` orientation of every packed weight);
* ``mobie_checksums``: JSON ``{stored key: crc32 of its bytes}`` for every tensor of the file;
* ``mobie_checksums_converted`` (``save_pretrained`` only, when transformers changes anything): the same for
  the tensors as transformers writes them. transformers 5 reverts its checkpoint conversion mapping on save
  (e.g. Mixtral's ``mlp.experts`` -> ``block_sparse_moe.experts``, GraniteMoE's router, the
  ``e_score_correction_bias`` buffers), after the quantizer gave it the state dict and the metadata, and
  applies the mapping again on load after the quantizer checked the files: the checksums are checked
  against the set whose keys the file holds (:func:`file_checksums`);
* ``mobie_aliases``: JSON ``{key: kept key}`` for tied tensors stored once.

Loading checks the format name and version, every tensor's presence, checksum, dtype and shape
(against the logical shape), and raises :class:`MoBiECheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping

import torch

from .mobie_tensor import MoBiETensor
from ..kernels.packing import packed_length

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MoBiECheckpointError", "flatten_state_dict",
           "format_version", "unflatten_state_dict", "read_checkpoint", "WEIGHTS_NAME"]

FORMAT_NAME = "mobie-packed"
# 3: transposed parameters ("transposed" in mobie_tensors; written only by files that hold one, so that
#    the others stay readable by version-2 readers, which would misread a square transposed weight);
# 2: scales as 8-bit log codes + scale_grid; 1 (fp16 scales) is still read
FORMAT_VERSION = 3
PLAIN_VERSION = 2  # what a file without transposed parameters is written as
READABLE_VERSIONS = (1, 2, 3)
WEIGHTS_NAME = "model.safetensors"


class MoBiECheckpointError(ValueError):
    """A packed checkpoint is truncated, corrupted, incomplete or of an incompatible format version."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise MoBiECheckpointError(f"unknown dtype {name!r}")
    return dt


def _crc(t: torch.Tensor) -> int:
    t = t.detach().contiguous().cpu()
    return zlib.crc32(t.view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def _split(fqn: str) -> tuple[str, str]:
    return fqn.rsplit(".", 1) if "." in fqn else ("", fqn)


def stored_key(fqn: str, data_name: str) -> str:
    mod, p = _split(fqn)
    return f"{mod}._{p}_{data_name}" if mod else f"_{p}_{data_name}"


def format_version(tensors) -> int:
    """The format version a file holding ``tensors`` (packed or not) is written as: 3 when one of them is a
    transposed packed parameter, else 2."""
    return FORMAT_VERSION if any(isinstance(t, MoBiETensor) and t.transposed for t in tensors) else PLAIN_VERSION


def flatten_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors + string metadata for safetensors (shared plain tensors stored once)."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for fqn, t in state_dict.items():
        if isinstance(t, MoBiETensor):
            names, attrs = t.__tensor_flatten__()
            described[fqn] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "side": attrs["side"],
                              "data": list(names)}
            if t.transposed:
                described[fqn]["transposed"] = True
            for n in names:
                tensors[stored_key(fqn, n)] = getattr(t, n).detach().contiguous()
            continue
        t = t.detach()
        key = (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in by_storage:
            aliases[fqn] = by_storage[key]
            continue
        if key is not None:
            by_storage[key] = fqn
        tensors[fqn] = t.contiguous()
    meta = {"format": "pt", "mobie_format": FORMAT_NAME,
            "mobie_format_version": str(format_version(state_dict.values())),
            "mobie_tensors": json.dumps(described, sort_keys=True),
            "mobie_checksums": json.dumps(checksums(tensors), sort_keys=True),
            "mobie_aliases": json.dumps(aliases, sort_keys=True)}
    return tensors, meta


def check_metadata(metadata: Mapping[str, str] | None, filename: str) -> None:
    """Format name and version of a packed checkpoint, or a :class:`MoBiECheckpointError`."""
    metadata = metadata or {}
    if metadata.get("mobie_format") != FORMAT_NAME:
        raise MoBiECheckpointError(f"{filename}: not a MoBiE packed checkpoint (metadata mobie_format="
                                   f"{metadata.get('mobie_format')!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(metadata.get("mobie_format_version", ""))
    except ValueError:
        raise MoBiECheckpointError(f"{filename}: unreadable mobie_format_version "
                                   f"{metadata.get('mobie_format_version')!r}") from None
    if version not in READABLE_VERSIONS:
        raise MoBiECheckpointError(f"{filename}: MoBiE packed format version {version} is not supported by this "
                                   f"torchao_mobie (reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                                   + ("upgrade torchao_mobie" if version > FORMAT_VERSION else "re-export the model"))


def _json(metadata, key, filename):
    try:
        return json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise MoBiECheckpointError(f"{filename}: corrupted metadata field {key!r} ({e})") from None


def _expected_shapes(shape, side, names, t: dict) -> dict[str, tuple]:
    E, m, n = shape
    P = t["qdata_x"].shape[1] if "qdata_x" in t and t["qdata_x"].dim() == 4 else 0
    exp = {"qdata": (E, m, packed_length(n)), "row_scale": (E, m), "col_scale": (E, n), "mean": (E, m),
           "scale_grid": (E, 3 + P, 2), "qdata_x": (E, P, m, packed_length(n)), "col_scale_x": (E, P, n)}
    if "col_scale2" in t:
        s = t["col_scale2"].shape[-1]
        exp.update(qdata2=(E, s, packed_length(m)), col_scale2=(E, s), salient=(E, packed_length(n)))
    if "backbone" in t:
        nb = t["backbone"].shape[0]
        k = (m if side == "output" else n) // max(1, nb)
        exp.update(backbone=(nb, k, k), backbone_scale=(nb, k))
    return exp


_SCALE = (torch.uint8, torch.float16)  # 8-bit log codes (format 2, with scale_grid) or fp16 (format 1)
_DTYPES = {"qdata": (torch.int32,), "row_scale": _SCALE, "col_scale": _SCALE,
           "qdata2": (torch.int32,), "col_scale2": _SCALE, "salient": (torch.int32,),
           "qdata_x": (torch.int32,), "col_scale_x": _SCALE,
           "mean": (torch.float16,), "backbone_scale": (torch.float16,), "scale_grid": (torch.float16,),
           "backbone": (torch.int8, torch.bfloat16, torch.float32, torch.float16)}


def build_tensor(fqn: str, desc: dict, data: dict[str, torch.Tensor], filename: str) -> MoBiETensor:
    """Validate the stored tensors of one packed parameter and rebuild it."""
    shape, side = tuple(desc["shape"]), desc["side"]
    transposed = desc.get("transposed", False)
    if not isinstance(transposed, bool) or len(shape) != 3:
        raise MoBiECheckpointError(f"{filename}: {fqn} has an unreadable description {desc}")
    canonical = (shape[0], shape[2], shape[1]) if transposed else shape  # the data's [E, out, in]
    missing = [stored_key(fqn, n) for n in desc["data"] if n not in data]
    if missing:
        raise MoBiECheckpointError(f"{filename}: tensor {missing[0]} of packed parameter {fqn} is missing "
                                   "(truncated or incomplete checkpoint)")
    exp = _expected_shapes(canonical, side, desc["data"], data)
    for n, t in data.items():
        if n not in _DTYPES:
            raise MoBiECheckpointError(f"{filename}: unknown data {stored_key(fqn, n)} for {fqn}")
        if t.dtype not in _DTYPES[n]:
            raise MoBiECheckpointError(f"{filename}: tensor {stored_key(fqn, n)} has dtype {t.dtype}, expected "
                                       f"{' or '.join(map(str, _DTYPES[n]))}")
        if n in exp and tuple(t.shape) != exp[n]:
            raise MoBiECheckpointError(f"{filename}: tensor {stored_key(fqn, n)} has shape {list(t.shape)}, "
                                       f"expected {list(exp[n])} for {fqn} {list(shape)}"
                                       + (" (transposed)" if transposed else ""))
    scale_names = ("row_scale", "col_scale", "col_scale2", "col_scale_x")
    coded = [n for n in scale_names if n in data and data[n].dtype == torch.uint8]
    if coded and "scale_grid" not in data:
        raise MoBiECheckpointError(f"{filename}: {fqn} stores 8-bit scale codes ({', '.join(coded)}) without their "
                                   f"scale_grid (truncated or inconsistent checkpoint)")
    if "scale_grid" in data and len(coded) != len([n for n in scale_names if n in data]):
        raise MoBiECheckpointError(f"{filename}: {fqn} mixes 8-bit scale codes and fp16 scales")
    if ("qdata_x" in data) != ("col_scale_x" in data):
        raise MoBiECheckpointError(f"{filename}: {fqn} stores only one of qdata_x / col_scale_x (truncated or "
                                   "inconsistent checkpoint)")
    kw = {k: v for k, v in data.items() if k not in ("qdata", "row_scale", "col_scale")}
    return MoBiETensor(data["qdata"], data["row_scale"], data["col_scale"], side, _dtype(desc["dtype"]), **kw,
                       transposed=transposed)


CONVERTED_CHECKSUMS = "mobie_checksums_converted"


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{key: crc32 of the tensor's bytes}``, as stored in ``mobie_checksums``."""
    return {k: _crc(v) for k, v in tensors.items()}


def file_checksums(metadata: Mapping[str, str], keys, filename: str) -> dict[str, int]:
    """The checksums of the file's naming: ``mobie_checksums`` (the model's names) or, when the file holds
    the names transformers converted on save, ``mobie_checksums_converted``."""
    sums = _json(metadata, "mobie_checksums", filename)
    if CONVERTED_CHECKSUMS in (metadata or {}):
        converted = _json(metadata, CONVERTED_CHECKSUMS, filename)
        keys = set(keys)
        if len(keys & set(converted)) > len(keys & set(sums)):
            return converted
    return sums


def verify_checksums(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], filename: str,
                     require_all: bool = True) -> dict[str, int]:
    """crc32 of every tensor listed in the metadata; ``require_all``: every listed tensor must be present
    (False for one shard of a sharded checkpoint, whose metadata lists the tensors of every shard).
    A tensor the metadata does not list is an error too. Returns the checksums used (:func:`file_checksums`)."""
    sums = file_checksums(metadata, tensors.keys(), filename)
    for k, t in tensors.items():
        if k not in sums:
            raise MoBiECheckpointError(f"{filename}: tensor {k} has no checksum in the file's metadata (not written "
                                       "by this torchao_mobie, or edited afterwards)")
        if _crc(t) != sums[k]:
            raise MoBiECheckpointError(f"{filename}: tensor {k} is corrupted (checksum mismatch)")
    if require_all:
        missing = sorted(set(sums) - set(tensors))
        if missing:
            raise MoBiECheckpointError(f"{filename}: tensor {missing[0]} is missing (truncated or incomplete "
                                       "checkpoint)")
    return sums


def unflatten_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                         filename: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state_dict` (after :func:`check_metadata` / :func:`verify_checksums`)."""
    described = _json(metadata, "mobie_tensors", filename)
    aliases = _json(metadata, "mobie_aliases", filename)
    out = dict(tensors)
    for fqn, desc in described.items():
        mod, p = _split(fqn)
        prefix = f"{mod}._{p}_" if mod else f"_{p}_"
        data = {}
        for n in list(desc["data"]) + [x for x in _DTYPES if x not in desc["data"]]:
            k = prefix + n
            if k in out:
                data[n] = out.pop(k)
        out[fqn] = build_tensor(fqn, desc, data, filename)
    for k, src in aliases.items():
        if src not in out:
            raise MoBiECheckpointError(f"{filename}: tensor {src} (tied to {k}) is missing")
        out[k] = out[src]
    return out


def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            check_metadata(metadata, path)
            tensors = {}
            for k in f.keys():
                try:
                    tensors[k] = f.get_tensor(k)
                except (SafetensorError, RuntimeError, OSError) as e:
                    raise MoBiECheckpointError(f"{path}: cannot read tensor {k} ({e}); the file is truncated or "
                                               "corrupted") from None
    except SafetensorError as e:
        raise MoBiECheckpointError(f"{path}: not a readable safetensors file ({e}); truncated or corrupted") from None
    return tensors, metadata


def verify_file(path: str, require_all: bool = True) -> tuple[set[str], dict[str, int]]:
    """Format and checksum of every tensor of a packed safetensors file; returns the keys it holds and the
    checksums it was checked against."""
    tensors, meta = _read_tensors(path)
    sums = verify_checksums(tensors, meta, path, require_all=require_all)
    return set(tensors), sums


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Load, validate and unflatten one packed safetensors file."""
    tensors, metadata = _read_tensors(path)
    verify_checksums(tensors, metadata, path)
    return unflatten_state_dict(tensors, metadata, path)
