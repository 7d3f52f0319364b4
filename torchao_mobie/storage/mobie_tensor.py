"""``MoBiETensor``: packed 1-bit storage of one fused 3D experts weight ``[E, out, in]``.

Representation (per projection, ``m = out``, ``n = in``)::

    Q_e   = row_scale[e][:, None] * (sign[e] * col_scale[e][None, :]  +  Σ_p sign_x[e, p] * col_scale_x[e, p][None, :]
                                     +  sign2[e] * col_scale2[e][None, :])
            (+ mean[e][:, None] when present)
    W[e]  = backbone @ Q_e   (side "output", backbone [m, m])
            Q_e @ backbone   (side "input",  backbone [n, n])
            Q_e              (side "none")

``sign_x``/``col_scale_x`` are optional further full binary planes (``P`` of them, for budgets past two
planes); ``sign2``/``col_scale2`` is an optional binary plane restricted to a few "salient" columns per
expert, on top of the full planes; ``backbone`` is block diagonal (``nb`` blocks ``[k, k]``), stored bf16 / fp32, or int8 with one
fp16 scale per row. Everything is computed in fp32 with exactly the operations of
:func:`torchao_mobie.algorithms.cejd.reconstruct`, so :meth:`MoBiETensor.dequantize` reproduces the
fake-quant weight bit for bit (same fp32 values before the final cast).

Tensor data (the only memory the tensor holds):

====================  ===============================  ===================================================
name                  shape / dtype                    meaning
====================  ===============================  ===================================================
qdata                 [E, m, ceil(n/32)] int32          signs, packed along ``in`` (the reduction dim)
row_scale             [E, m] uint8 | fp16               per-row (output) scale: 8-bit log code (or fp16)
col_scale             [E, n] uint8 | fp16               per-column (input) scale: 8-bit log code (or fp16)
scale_grid (opt)      [E, 3 + P, 2] fp16                (lo, step) of the row / column / salient-plane / full
                                                        planes' codes; present iff the scales are codes
qdata_x (opt)         [E, P, m, ceil(n/32)] int32       signs of the further full planes (packed as qdata)
col_scale_x (opt)     [E, P, n] uint8 | fp16            their column scales
backbone (opt)        [nb, k, k] bf16 | int8 | fp32     shared backbone blocks (k*nb = m or n)
backbone_scale (opt)  [nb, k] fp16                      per-row scale of an int8 backbone
qdata2 (opt)          [E, s, ceil(m/32)] int32          second-plane signs of the ``s`` salient columns,
                                                        packed along ``out`` (one column per row)
col_scale2 (opt)      [E, s] uint8 | fp16               second-plane column scales (0 = padding slot)
salient (opt)         [E, ceil(n/32)] int32             packed bitmap of the salient columns
mean (opt)            [E, m] fp16                       per-row mean added to the factor
====================  ===============================  ===================================================

Non-tensor attributes: ``side`` ("output" | "input" | "none"), ``dtype`` (the logical dtype) and
``transposed`` (a ``[E, in, out]`` view made by ``transpose(-2, -1)``, for transformers' grouped_mm path;
parameters are never transposed).
As for every torchao tensor, ``.to(device)`` moves the packed data while a requested dtype is ignored
(``model.half()`` leaves the packed weights and their logical dtype as they are).
The logical shape is ``[E, m, n]``. Salient columns of expert ``e`` are, in ascending order, the first
entries of ``stable_argsort(~bitmap[e])`` (:meth:`MoBiETensor.salient_index`); experts with fewer
than ``s`` salient columns fill the remaining slots with non-salient columns and a zero scale.
"""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from ..algorithms.factors import SIDES, CEJDFactors, factor_bits
from ..algorithms.result import BitBudget
from ..algorithms.scale_codes import decode_log8
from ..kernels.dispatch import factor_mm
from ..kernels.packing import pack_signs, packed_length, salient_slot_index, unpack_bits, unpack_signs

__all__ = ["MoBiETensor", "SIDES"]

_BACKBONE_DTYPES = {torch.bfloat16: "bfloat16", torch.int8: "int8", torch.float32: "float32",
                    torch.float16: "float16"}
FP16_BITS = 16


def _as_dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


class MoBiETensor(TorchAOBaseTensor):
    """Packed MoBiE weight of a fused experts projection (see the module docstring for the layout)."""

    tensor_data_names = ["qdata", "row_scale", "col_scale"]
    tensor_attribute_names = ["side", "dtype"]
    optional_tensor_data_names = ["backbone", "backbone_scale", "qdata2", "col_scale2", "salient", "mean",
                                  "scale_grid", "qdata_x", "col_scale_x"]
    optional_tensor_attribute_names = ["transposed"]

    def __new__(cls, qdata, row_scale, col_scale, side, dtype, backbone=None, backbone_scale=None, qdata2=None,
                col_scale2=None, salient=None, mean=None, scale_grid=None, qdata_x=None, col_scale_x=None,
                transposed=False):
        E, m, n = row_scale.shape[0], row_scale.shape[1], col_scale.shape[1]
        shape = (E, n, m) if transposed else (E, m, n)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata, row_scale, col_scale, side, dtype, backbone=None, backbone_scale=None, qdata2=None,
                 col_scale2=None, salient=None, mean=None, scale_grid=None, qdata_x=None, col_scale_x=None,
                 transposed=False):
        super().__init__()
        self.transposed = bool(transposed)
        self.qdata = qdata
        self.row_scale = row_scale
        self.col_scale = col_scale
        self.side = side
        self.backbone = backbone
        self.backbone_scale = backbone_scale
        self.qdata2 = qdata2
        self.col_scale2 = col_scale2
        self.salient = salient
        self.mean = mean
        self.scale_grid = scale_grid
        self.qdata_x = qdata_x
        self.col_scale_x = col_scale_x

    def _quantization_type(self):
        nb = 0 if self.backbone is None else self.backbone.shape[0]
        bdt = None if self.backbone is None else _as_dtype_name(self.backbone.dtype)
        s = 0 if self.col_scale2 is None else self.col_scale2.shape[1]
        return (f"shape={list(self.shape)}, transposed={self.transposed}, side={self.side}, backbone={bdt}x{nb}, "
                f"full_planes={1 + self.extra_planes}, salient_plane_cols={s}")

    def __repr__(self):
        return f"MoBiETensor({self._quantization_type()}, dtype={self.dtype}, stored_bytes={self.storage_bytes()})"

    def _stable_hash_for_caching(self) -> str:
        """Metadata-only cache key for AOT autograd (tensor metadata, like DTensor's)."""
        import hashlib

        names, attrs = self.__tensor_flatten__()
        key = [type(self).__qualname__, tuple(self.shape), str(self.dtype), str(self.device), attrs["side"],
               attrs.get("transposed", False)]
        for n in names:
            t = getattr(self, n)
            key.append((n, tuple(t.shape), str(t.dtype), tuple(t.stride())))
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, factors, dtype: torch.dtype = torch.bfloat16) -> "MoBiETensor":
        """Pack the stored form left by MoBiE / CEJD: a :class:`~torchao_mobie.algorithms.factors.CEJDFactors`
        or its dict form (stacked tensors under the field names, codes as ``row_code``/``col_code``/
        ``col_code2``/``col_code_x``/``scale_grid``, ``backbone`` = ``{"blocks": [nb,k,k], "scale": [nb,k] |
        None}``), or a list of per-expert dicts without the expert dim (the backbone shared)."""
        f = CEJDFactors.from_dict(factors)
        side = f.side
        if side not in SIDES:
            raise ValueError(f"MoBiE factors: side must be one of {SIDES}, got {side!r}")
        if f.backbone is None and side != "none":
            raise ValueError(f"MoBiE factors: side {side!r} needs a backbone")
        sign = torch.as_tensor(f.sign)
        if sign.dim() != 3:
            raise ValueError(f"MoBiE factors: sign must be [E, out, in], got {list(sign.shape)}")
        E, m, n = sign.shape
        codes = f.codes
        coded = codes is not None
        if coded:
            P = f.extra_planes
            scale_grid = _checked(codes.grid, (E, 3 + P, 2), torch.float16, "scale_grid")
            row_scale = _checked(codes.row, (E, m), torch.uint8, "row_code")
            col_scale = _checked(codes.col, (E, n), torch.uint8, "col_code")
            g = scale_grid
            for key, coded_t, grid in (("row_scale", row_scale, g[:, 0]), ("col_scale", col_scale, g[:, 1])):
                v = torch.as_tensor(getattr(f, key))  # the decoded values must be the codes' (else a silent mismatch)
                if tuple(v.shape) != tuple(coded_t.shape) or not torch.equal(v.half(), decode_log8(coded_t, grid)):
                    raise ValueError(f"MoBiE factors: {key} {list(v.shape)} does not match its 8-bit codes "
                                     f"{list(coded_t.shape)} (pass the codes' decoded values or leave it out)")
        else:
            scale_grid = None
            row_scale = _as_half(f.row_scale, (E, m), "row_scale")
            col_scale = _as_half(f.col_scale, (E, n), "col_scale")
        qdata = pack_signs(sign)
        backbone = backbone_scale = None
        if f.backbone is not None and side != "none":
            blocks = f.backbone.blocks
            if blocks.dim() == 2:
                blocks = blocks.unsqueeze(0)
            nb, k, k2 = blocks.shape
            expect = m if side == "output" else n
            if k != k2 or nb * k != expect:
                raise ValueError(f"MoBiE factors: {side}-side backbone blocks {list(blocks.shape)} do not make a "
                                 f"[{expect}, {expect}] matrix")
            backbone = blocks.contiguous()
            scale = f.backbone.scale
            if backbone.dtype == torch.int8:
                if scale is None:
                    raise ValueError("MoBiE factors: an int8 backbone needs a per-row scale")
                backbone_scale = _as_half(scale.reshape(nb, k), (nb, k), "backbone scale")
            elif backbone.dtype not in _BACKBONE_DTYPES:
                raise ValueError(f"MoBiE factors: unsupported backbone dtype {backbone.dtype}")
        qdata2 = col_scale2 = salient = None
        if f.sign2 is not None:
            sal = f.salient
            if sal is None:
                sal = torch.as_tensor(f.col_scale2) != 0
            sal = sal.to(torch.bool).reshape(E, n)
            s = max(1, int(sal.sum(-1).max()))
            idx = salient_slot_index(sal, s)  # [E, s]
            valid = sal.gather(1, idx)
            s2 = torch.as_tensor(f.sign2).gather(2, idx[:, None, :].expand(E, m, s))  # [E, m, s]
            s2 = torch.where(valid[:, None, :], s2, torch.ones_like(s2))
            qdata2 = pack_signs(s2.transpose(1, 2))  # [E, s, ceil(m/32)]
            if coded:
                c2 = _checked(codes.col2, (E, n), torch.uint8, "col_code2")
                col_scale2 = torch.where(valid, c2.gather(1, idx), torch.zeros((), dtype=torch.uint8))
            else:
                col_scale2 = torch.where(valid, torch.as_tensor(f.col_scale2).to(torch.float16).gather(1, idx),
                                         torch.zeros((), dtype=torch.float16))
            salient = pack_signs(torch.where(sal, 1, -1))
        qdata_x = col_scale_x = None
        if f.sign_x is not None:
            sx = torch.as_tensor(f.sign_x)
            if sx.dim() != 4 or tuple(sx.shape[:1]) + tuple(sx.shape[2:]) != (E, m, n):
                raise ValueError(f"MoBiE factors: sign_x must be [E, P, out, in] = [{E}, P, {m}, {n}], got "
                                 f"{list(sx.shape)}")
            P = sx.shape[1]
            qdata_x = pack_signs(sx)
            col_scale_x = (_checked(codes.col_x, (E, P, n), torch.uint8, "col_code_x") if coded
                           else _as_half(f.col_scale_x, (E, P, n), "col_scale_x"))
        mean = None if f.mean is None else _as_half(f.mean, (E, m), "mean")
        return cls(qdata, row_scale, col_scale, side, dtype, backbone=backbone, backbone_scale=backbone_scale,
                   qdata2=qdata2, col_scale2=col_scale2, salient=salient, mean=mean, scale_grid=scale_grid,
                   qdata_x=qdata_x, col_scale_x=col_scale_x)

    # ------------------------------------------------------------------------------------------
    # reconstruction
    # ------------------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.row_scale.shape[0]

    @property
    def out_features(self) -> int:
        """``m`` of the (untransposed) ``[E, m, n]`` weight."""
        return self.row_scale.shape[1]

    @property
    def in_features(self) -> int:
        return self.col_scale.shape[1]

    def _dims(self) -> tuple[int, int, int]:
        return self.num_experts, self.out_features, self.in_features

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """fp16 ``(row [E, m], column [E, n], second-plane column [E, s] or None)`` scales, decoded from
        their 8-bit log codes when the tensor holds codes."""
        if self.scale_grid is None:
            return self.row_scale, self.col_scale, self.col_scale2
        g = self.scale_grid
        c2 = None if self.col_scale2 is None else decode_log8(self.col_scale2, g[:, 2])
        return decode_log8(self.row_scale, g[:, 0]), decode_log8(self.col_scale, g[:, 1]), c2

    @property
    def extra_planes(self) -> int:
        """Full binary planes beyond the first (``P``)."""
        return 0 if self.qdata_x is None else self.qdata_x.shape[1]

    def extra_scales(self) -> torch.Tensor | None:
        """fp16 ``[E, P, n]`` column scales of the further full planes (decoded from codes), or None."""
        if self.col_scale_x is None:
            return None
        if self.scale_grid is None:
            return self.col_scale_x
        return decode_log8(self.col_scale_x, self.scale_grid[:, 3:])

    def salient_index(self) -> torch.Tensor | None:
        """``[E, s]`` int64 column indices of the second plane's slots (None without a second plane)."""
        if self.qdata2 is None:
            return None
        sal = unpack_bits(self.salient, self.in_features).bool()
        return salient_slot_index(sal, self.col_scale2.shape[1])

    def backbone_matrix(self) -> torch.Tensor | None:
        """The full (block-diagonal) backbone in fp32, exactly as ``cejd.backbone_matrix``."""
        if self.backbone is None or self.side == "none":
            return None
        blocks = self.backbone
        if blocks.dtype == torch.int8:
            blocks = blocks.float() * self.backbone_scale.float()[:, :, None]
        return torch.block_diag(*blocks.float().unbind(0))

    def factor(self, experts: torch.Tensor | int | None = None) -> torch.Tensor:
        """fp32 binary factors ``Q_e`` (``[E, m, n]``, or of the selected experts)."""
        m, n = self.out_features, self.in_features
        single = isinstance(experts, int)
        if single:
            experts = torch.tensor([experts], device=self.qdata.device)

        def take(t):
            return t if experts is None else t[experts]

        row_scale, col_scale, col_scale2 = self.scales()
        C = unpack_signs(take(self.qdata), n) * take(col_scale).float()[..., None, :]
        if self.qdata_x is not None:  # further full planes, in order (as cejd.reconstruct)
            qx, cx = take(self.qdata_x), take(self.extra_scales())
            for p in range(self.extra_planes):
                C = C + unpack_signs(qx.select(-3, p), n) * cx.select(-2, p).float()[..., None, :]
        if self.qdata2 is not None:
            idx = take(self.salient_index())
            c2 = take(col_scale2)
            valid = c2 != 0
            s2 = unpack_signs(take(self.qdata2), m).transpose(-1, -2)  # [.., m, s]
            s2 = s2 * valid[..., None, :].float()
            full_s2 = torch.zeros(C.shape, dtype=torch.float32, device=C.device)
            full_s2.scatter_(-1, idx[..., None, :].expand(*C.shape[:-1], idx.shape[-1]), s2)
            full_c2 = torch.zeros(C.shape[:-2] + (n,), dtype=torch.float16, device=C.device)
            full_c2.scatter_(-1, idx, c2)
            C = C + full_s2 * full_c2.float()[..., None, :]
        Q = take(row_scale).float()[..., :, None] * C
        if self.mean is not None:
            Q = Q + take(self.mean).float()[..., :, None]
        return Q[0] if single else Q

    def dequantize(self, output_dtype: torch.dtype | None = None, experts=None) -> torch.Tensor:
        """The weight ``[E, m, n]`` (or of the selected experts) in ``output_dtype`` (default: the
        logical dtype); fp32 values identical to :func:`cejd.reconstruct` of the packed parts."""
        Q = self.factor(experts)
        M = self.backbone_matrix()
        if M is not None:
            Q = M @ Q if self.side == "output" else Q @ M
        if self.transposed:  # contiguous, as the dense [E, in, out] parameter it stands for (same BLAS paths)
            Q = Q.transpose(-1, -2).contiguous()
        return Q.to(output_dtype or self.dtype)

    # ------------------------------------------------------------------------------------------
    # accounting
    # ------------------------------------------------------------------------------------------

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        names, _ = self.__tensor_flatten__()
        return {k: getattr(self, k) for k in names}

    def storage_bytes(self) -> int:
        """Bytes of every tensor this weight really holds (packed signs, scales, bitmap, backbone)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def padding_bits(self) -> int:
        """Bits stored only because packed dimensions are rounded up to 32-bit words."""
        E, m, n = self._dims()
        pad = E * m * (packed_length(n) * 32 - n) * (1 + self.extra_planes)
        if self.qdata2 is not None:
            s = self.col_scale2.shape[1]
            pad += E * s * (packed_length(m) * 32 - m) + E * (packed_length(n) * 32 - n)
        return pad

    def bit_budget(self) -> BitBudget:
        """All-inclusive bit accounting of the logical content (:func:`~torchao_mobie.algorithms.factors.factor_bits`:
        every stored second-plane slot counts, padding slots included; word padding does not)."""
        E, m, n = self._dims()
        bb_bits = 0
        if self.backbone is not None:
            bb_bits = self.backbone.numel() * self.backbone.element_size() * 8
            if self.backbone_scale is not None:
                bb_bits += self.backbone_scale.numel() * FP16_BITS
        return factor_bits(E, m, n, planes=1 + self.extra_planes,
                           salient_slots=0 if self.col_scale2 is None else self.col_scale2.numel(),
                           bitmap=self.qdata2 is not None, coded=self.scale_grid is not None,
                           mean=self.mean is not None, backbone=bb_bits)

    # ------------------------------------------------------------------------------------------
    # fused building blocks (used by the "mobie" experts implementation)
    # ------------------------------------------------------------------------------------------

    def backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        """``S x`` for an input-side backbone (``x [.., n]`` fp32); identity otherwise."""
        if self.side != "input" or self.backbone is None:
            return x
        return x @ self.backbone_matrix().t()

    def backbone_output(self, z: torch.Tensor) -> torch.Tensor:
        """``M z`` for an output-side backbone (``z [.., m]`` fp32); identity otherwise."""
        if self.side != "output" or self.backbone is None:
            return z
        return z @ self.backbone_matrix().t()

    def factor_mm(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``Q_{e_i} x_i`` for every row ``i`` (``x [S, n]``, ``expert_ids [S]``) -> ``[S, m]`` fp32, on the
        backend the kernel dispatch chooses (Triton on CUDA, else the ±1 reference)."""
        return factor_mm(self, x, expert_ids)


def _as_half(t, shape, what) -> torch.Tensor:
    t = torch.as_tensor(t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"MoBiE factors: {what} must be {list(shape)}, got {list(t.shape)}")
    if t.dtype != torch.float16:
        h = t.to(torch.float16)
        if not torch.equal(h.float(), t.float()):
            raise ValueError(f"MoBiE factors: {what} is {t.dtype} and not representable in fp16 (stored width)")
        t = h
    return t.contiguous()


def _checked(t, shape, dtype, what) -> torch.Tensor:
    t = torch.as_tensor(t)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"MoBiE factors: {what} must be {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
    return t.contiguous()
