"""The stored form of a CEJD-binarized projection, and the one formula for what it costs in bits.

One projection of ``E`` experts ``W_e [m, n]`` is kept as per-expert binary factors and an optional
shared backbone (MoBiE §4.1, :mod:`.cejd`)::

    Q_e = row_scale[e][:, None] * (sign[e] * col_scale[e][None, :]
                                   + Σ_p sign_x[e, p] * col_scale_x[e, p][None, :]
                                   + sign2[e] * col_scale2[e][None, :])   (+ mean[e][:, None])
    W_hat[e] = M @ Q_e (side "output"),  Q_e @ M (side "input"),  Q_e (side "none")

with ``M`` the block-diagonal backbone dequantized from its stored dtype. The fit (:mod:`.cejd`), the
packer (:class:`~torchao_mobie.storage.MoBiETensor`) and the bit planner (:mod:`.planner`) all read this
one type, and :func:`factor_bits` is the only place where stored bits are counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .result import BitBudget
from .scale_codes import CODE_BITS, GRID_FP16_PER_EXPERT, decode_log8

__all__ = ["SIDES", "Backbone", "ScaleCodes", "CEJDFactors", "factor_bits", "backbone_bits"]

SIDES = ("output", "input", "none")
FP16_BITS = 16
_BACKBONE_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8, "float32": torch.float32,
                    "float16": torch.float16}


def backbone_bits(nb: int, k: int, dtype: str) -> int:
    """Stored bits of ``nb`` backbone blocks ``[k, k]`` in ``dtype`` (int8 adds one fp16 scale per row)."""
    if dtype not in _BACKBONE_DTYPES:
        raise ValueError(f"unknown backbone dtype {dtype!r}; expected one of {sorted(_BACKBONE_DTYPES)}")
    width = torch.empty((), dtype=_BACKBONE_DTYPES[dtype]).element_size() * 8
    return nb * k * k * width + (nb * k * FP16_BITS if dtype == "int8" else 0)


def factor_bits(E: int, m: int, n: int, *, planes: int = 1, salient_slots: int = 0, bitmap: bool | None = None,
                coded: bool = True, mean: bool = False, backbone: int = 0) -> BitBudget:
    """Every stored bit of ``E`` binary factors ``[m, n]`` (all-inclusive convention).

    planes: full binary planes (signs and one column scale per plane and column);
    salient_slots: stored second-plane columns summed over experts (each: ``m`` signs and a column
        scale); ``bitmap``: the per-expert salient-column bitmap is stored (default: any slot);
    coded: scales are 8-bit log codes with a per-expert fp16 grid (else fp16 values);
    mean: a per-row fp16 mean; backbone: the shared backbone's stored bits (:func:`backbone_bits`).
    """
    bitmap = salient_slots > 0 if bitmap is None else bitmap
    scale = CODE_BITS if coded else FP16_BITS
    grid = (GRID_FP16_PER_EXPERT + 2 * (planes - 1)) * E if coded else 0  # (lo, step) per scale vector
    return BitBudget(n_weights=E * m * n, sign_bits=E * m * n * planes + m * salient_slots,
                     bitmap_bits=E * n if bitmap else 0,
                     param_bits=scale * (E * (m + n * planes) + salient_slots) + FP16_BITS * (E * m if mean else 0)
                     + FP16_BITS * grid,
                     backbone_bits=backbone)


@dataclass
class Backbone:
    """Shared backbone blocks ``[nb, k, k]`` in their stored dtype (int8: with an fp16 ``scale [nb, k]``
    per row); one object for every expert of the projection, counted once."""

    blocks: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def dtype(self) -> str:
        return str(self.blocks.dtype).replace("torch.", "")

    def matrix(self) -> torch.Tensor:
        """The full block-diagonal backbone in fp32, dequantized from its stored dtype."""
        blocks = self.blocks
        if blocks.dtype == torch.int8:
            blocks = blocks.float() * self.scale.float()[:, :, None]
        return torch.block_diag(*blocks.float().unbind(0))

    def bits(self) -> int:
        nb, k, _ = self.blocks.shape
        return backbone_bits(nb, k, self.dtype)


@dataclass
class ScaleCodes:
    """8-bit log codes of the scales (:mod:`.scale_codes`) and their per-expert grid ``[E, 3 + P, 2]``:
    rows, columns, salient-plane columns, then each further full plane's columns."""

    row: torch.Tensor  # [E, m] uint8
    col: torch.Tensor  # [E, n]
    grid: torch.Tensor  # [E, 3 + P, 2] fp16 (lo, step)
    col2: torch.Tensor | None = None  # [E, n]
    col_x: torch.Tensor | None = None  # [E, P, n]


@dataclass
class CEJDFactors:
    """A binarized projection ``[E, m, n]`` (see the module docstring). Scales hold their fp16 values
    (decoded from ``codes`` when the scales are stored as codes); ``sign2``/``col_scale2`` are zero outside
    the ``salient [E, n]`` columns."""

    side: str
    sign: torch.Tensor  # [E, m, n] ±1
    row_scale: torch.Tensor  # [E, m]
    col_scale: torch.Tensor  # [E, n]
    backbone: Backbone | None = None
    sign_x: torch.Tensor | None = None  # [E, P, m, n] further full planes
    col_scale_x: torch.Tensor | None = None  # [E, P, n]
    sign2: torch.Tensor | None = None  # [E, m, n] salient plane
    col_scale2: torch.Tensor | None = None  # [E, n]
    salient: torch.Tensor | None = None  # [E, n] bool
    mean: torch.Tensor | None = None  # [E, m]
    codes: ScaleCodes | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.sign.shape)

    @property
    def extra_planes(self) -> int:
        """Full binary planes beyond the first (``P``)."""
        return 0 if self.sign_x is None else self.sign_x.shape[-3]

    def reconstruct(self) -> torch.Tensor:
        """``W_hat [E, m, n]`` in fp32, exactly the documented formula (the packed tensor's ``dequantize``
        computes the same values)."""
        C = self.sign.float() * self.col_scale.float()[..., None, :]
        for p in range(self.extra_planes):  # further full planes, in order
            C = C + self.sign_x.select(-3, p).float() * self.col_scale_x.select(-2, p).float()[..., None, :]
        if self.sign2 is not None:
            C = C + self.sign2.float() * self.col_scale2.float()[..., None, :]
        Q = self.row_scale.float()[..., :, None] * C
        if self.mean is not None:
            Q = Q + self.mean.float()[..., :, None]
        if self.backbone is None or self.side == "none":
            return Q
        M = self.backbone.matrix()
        return M @ Q if self.side == "output" else Q @ M

    def bit_budget(self) -> BitBudget:
        """Stored bits (:func:`factor_bits`): the salient plane counts its columns, the backbone once."""
        E, m, n = self.shape
        two = self.sign2 is not None
        slots = int(self.salient.sum()) if two and self.salient is not None else 0
        return factor_bits(E, m, n, planes=1 + self.extra_planes, salient_slots=slots, bitmap=two,
                           coded=self.codes is not None, mean=self.mean is not None,
                           backbone=0 if self.backbone is None or self.side == "none" else self.backbone.bits())

    def experts(self, index) -> "CEJDFactors":
        """The factors of the selected experts (``index``: int, slice or index tensor), sharing the backbone."""
        if isinstance(index, int):
            index = slice(index, index + 1)

        def take(t):
            return None if t is None else t[index]

        codes = None if self.codes is None else ScaleCodes(**{f.name: take(getattr(self.codes, f.name))
                                                                for f in fields(ScaleCodes)})
        per_expert = {f.name: take(getattr(self, f.name)) for f in fields(self)
                      if f.name not in ("side", "backbone", "codes")}
        return replace(self, **per_expert, codes=codes)

    @classmethod
    def cat(cls, parts: Sequence["CEJDFactors"]) -> "CEJDFactors":
        """Experts of one projection fit separately, joined along the expert dim (they must share the side
        and the backbone object)."""
        first = parts[0]
        if any(p.side != first.side or p.backbone is not first.backbone for p in parts):
            raise ValueError("CEJDFactors.cat: the experts must share one side and one backbone")

        def join(get):
            vals = [get(p) for p in parts]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError("CEJDFactors.cat: an optional plane or code is present for some experts only")
            return torch.cat(vals)

        codes = None
        if first.codes is not None or any(p.codes is not None for p in parts):
            codes = ScaleCodes(**{f.name: join(lambda p, n=f.name: None if p.codes is None else getattr(p.codes, n))
                                  for f in fields(ScaleCodes)})
        return replace(first, **{f.name: join(lambda p, n=f.name: getattr(p, n)) for f in fields(cls)
                                 if f.name not in ("side", "backbone", "codes")}, codes=codes)

    @classmethod
    def from_dict(cls, parts) -> "CEJDFactors":
        """From the dict form (stacked tensors under the field names, codes as ``row_code``, ``col_code``,
        ``col_code2``, ``col_code_x``, ``scale_grid``; ``backbone`` = ``{"blocks", "scale"}`` or the blocks)
        or a list of per-expert dicts without the expert dim (the backbone shared)."""
        if isinstance(parts, CEJDFactors):
            return parts
        p = _stack_dicts(parts)
        side = p.get("side") or "none"
        sign = p.get("sign")
        if sign is None:
            raise ValueError("CEJD factors: sign [E, out, in] is required")
        sign = torch.as_tensor(sign)
        if sign.dim() != 3:
            raise ValueError(f"CEJD factors: sign must be [E, out, in], got {list(sign.shape)}")
        codes = None
        if p.get("scale_grid") is not None:
            grid = torch.as_tensor(p["scale_grid"])
            codes = ScaleCodes(row=p.get("row_code"), col=p.get("col_code"), grid=grid, col2=p.get("col_code2"),
                               col_x=p.get("col_code_x"))
            for name in ("row", "col"):
                if getattr(codes, name) is None:
                    raise ValueError(f"CEJD factors: scale_grid without {name}_code")
        row_scale, col_scale = p.get("row_scale"), p.get("col_scale")
        if codes is not None:  # the decoded values, unless given (then checked against the codes by validate)
            row_scale = decode_log8(codes.row, codes.grid[:, 0]) if row_scale is None else row_scale
            col_scale = decode_log8(codes.col, codes.grid[:, 1]) if col_scale is None else col_scale
        if row_scale is None or col_scale is None:
            raise ValueError("CEJD factors: row_scale and col_scale (or their codes) are required")
        bb = p.get("backbone")
        if bb is not None and not isinstance(bb, Backbone):
            bb = Backbone(bb["blocks"], bb.get("scale")) if isinstance(bb, Mapping) else Backbone(bb)
        sign2, col_scale2, salient = p.get("sign2"), p.get("col_scale2"), p.get("salient")
        if sign2 is not None and salient is None and col_scale2 is not None:
            salient = torch.as_tensor(col_scale2) != 0
        if sign2 is not None and col_scale2 is None and codes is not None and codes.col2 is not None:
            col_scale2 = decode_log8(codes.col2, codes.grid[:, 2])
        col_scale_x = p.get("col_scale_x")
        if p.get("sign_x") is not None and col_scale_x is None and codes is not None and codes.col_x is not None:
            col_scale_x = decode_log8(codes.col_x, codes.grid[:, 3:])
        return cls(side=side, sign=sign, row_scale=torch.as_tensor(row_scale), col_scale=torch.as_tensor(col_scale),
                   backbone=bb, sign_x=p.get("sign_x"), col_scale_x=col_scale_x, sign2=sign2, col_scale2=col_scale2,
                   salient=salient, mean=p.get("mean"), codes=codes)


_DICT_KEYS = ("sign", "row_scale", "col_scale", "sign2", "col_scale2", "salient", "mean", "row_code", "col_code",
              "col_code2", "scale_grid", "sign_x", "col_scale_x", "col_code_x")


def _stack_dicts(parts) -> dict:
    if isinstance(parts, Mapping):
        p = dict(parts)
        if p.get("backbone") is None and p.get("backbone_ref") is not None:
            p["backbone"] = p["backbone_ref"]
        return p
    if not isinstance(parts, Sequence) or isinstance(parts, (str, bytes)) or not parts:
        raise TypeError(f"CEJD factors must be CEJDFactors, a dict of stacked tensors or a list of per-expert dicts, "
                        f"got {type(parts).__name__}")
    first = parts[0]
    out = {"side": first.get("side") or "none", "backbone": first.get("backbone", first.get("backbone_ref"))}
    for key in _DICT_KEYS:
        vals = [pe.get(key) for pe in parts]
        if all(v is None for v in vals):
            continue
        if any(v is None for v in vals):
            raise ValueError(f"CEJD factors: {key} is present for some experts only")
        out[key] = torch.stack([torch.as_tensor(v) for v in vals])
    return out
