"""The aten / torch-function dispatch table of :class:`MoBiETensor`: how transformers' generic experts
implementations (eager, batched_mm, grouped_mm) run on packed weights.

``eager`` / ``batched_mm`` select or index experts (only those are dequantized); ``grouped_mm`` transposes the
weight (a lazy view) and calls ``_grouped_mm``, which runs the binary factors through the kernel dispatch
(:func:`~torchao_mobie.kernels.dispatch.factor_mm`) without dequantizing. Experts classes outside the experts
interface that multiply by their ``[E, in, out]`` weights with ``torch.bmm`` (llama4's ``Llama4TextExperts``:
every expert on every token, ``routed_in [E, T, H] @ gate_up_proj``) run the binary factors the same way
(:func:`packed_bmm`). Importing this module fills the table (``torchao_mobie.registrations`` does, with every
other import-time registration).
"""

from __future__ import annotations

import torch

from .mobie_tensor import MoBiETensor

__all__ = ["packed_bmm", "packed_grouped_mm", "register_grouped_mm_fallback"]

aten = torch.ops.aten
# ----------------------------------------------------------------------------------------------
# aten / torch-function dispatch (generic experts implementations: eager, batched_mm, grouped_mm)
# ----------------------------------------------------------------------------------------------

implements = MoBiETensor.implements
implements_torch_function = MoBiETensor.implements_torch_function


@implements(aten.select.int)
def _(func, types, args, kwargs):
    self, dim, index = args[0], args[1], args[2]
    if dim != 0:
        raise NotImplementedError(f"MoBiETensor: select along dim {dim}; only expert selection (dim 0) is supported")
    index = int(index)
    if index < 0:
        index += self.shape[0]
    return self.dequantize(experts=torch.tensor([index], device=self.qdata.device))[0]


@implements(aten.index.Tensor)
def _(func, types, args, kwargs):
    self, indices = args[0], args[1]
    if len(indices) != 1 or indices[0] is None:
        raise NotImplementedError("MoBiETensor: only indexing the expert dim with one index tensor is supported")
    idx = indices[0]
    if idx.dtype == torch.bool:
        idx = idx.nonzero().squeeze(-1)
    flat = idx.reshape(-1).long()
    w = self.dequantize(experts=flat)
    return w.reshape(*idx.shape, *self.shape[1:])


@implements(aten.transpose.int)
def _(func, types, args, kwargs):
    # grouped_mm path: a lazily transposed view, consumed by _grouped_mm below without dequantizing
    self, d0, d1 = args[0], args[1], args[2]
    if {d0 % 3, d1 % 3} != {1, 2}:
        raise NotImplementedError(f"MoBiETensor: transpose({d0}, {d1}); only the last two dims can be swapped")
    names, attrs = self.__tensor_flatten__()
    kw = {n: getattr(self, n) for n in names if n not in MoBiETensor.tensor_data_names}
    return MoBiETensor(self.qdata, self.row_scale, self.col_scale, self.side, self.dtype, **kw,
                       transposed=not self.transposed)


def packed_grouped_mm(x: torch.Tensor, w: "MoBiETensor", offs: torch.Tensor) -> torch.Tensor:
    """``x [S, n]`` rows grouped by expert (``offs``: cumulative row counts) times the transposed packed
    weight ``w [E, n, m]`` -> ``[S, m]`` in ``w.dtype``; rows past ``offs[-1]`` are zero. Only the
    experts that own rows are unpacked."""
    if not w.transposed:
        raise NotImplementedError("grouped_mm needs the [E, in, out] (transposed) view of a MoBiETensor")
    S = x.shape[0]
    rows = torch.arange(S, device=x.device)
    ids = torch.searchsorted(offs.to(torch.int64), rows, right=True)
    valid = ids < w.num_experts
    ids = ids.clamp(max=w.num_experts - 1)
    xf = w.backbone_input(x.float())
    y = w.backbone_output(w.factor_mm(xf, ids))
    y = torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y.to(w.dtype)


@implements(aten._grouped_mm.default)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    if not isinstance(w, MoBiETensor) or isinstance(x, MoBiETensor) or offs is None or x.dim() != 2:
        raise NotImplementedError("MoBiETensor: only _grouped_mm(x [S, in], packed weight [E, in, out], offs) "
                                  "is supported")
    y = packed_grouped_mm(x, w, offs)
    if bias is not None:
        raise NotImplementedError("MoBiETensor: _grouped_mm with bias")
    return y.to(out_dtype) if out_dtype is not None else y


def packed_bmm(x: torch.Tensor, w: "MoBiETensor") -> torch.Tensor:
    """``x [E, T, n] @ w [E, n, m]`` (the transposed packed weight: ``x[e] @ W_eᵀ`` of the ``[E, m, n]`` data) ->
    ``[E, T, m]`` in ``w.dtype``. Outside a compile trace, all-zero rows (llama4's tokens an expert was not
    routed: their router score is 0) are skipped: their product is zero (the factors have no bias)."""
    if not w.transposed:
        raise NotImplementedError("MoBiETensor: bmm(x, w) needs the [E, in, out] (transposed) view of the packed "
                                  "weight (x [E, T, in] @ w)")
    E, T, n = x.shape
    if E != w.num_experts or n != w.in_features:
        raise ValueError(f"MoBiETensor: bmm of x {list(x.shape)} with a packed weight {list(w.shape)}")
    rows = x.reshape(E * T, n)
    ids = torch.arange(E, device=x.device).repeat_interleave(T)
    keep = None
    if not torch.compiler.is_compiling():
        keep = rows.ne(0).any(-1).nonzero().squeeze(-1)
        if keep.numel() == rows.shape[0]:
            keep = None
        else:
            rows, ids = rows.index_select(0, keep), ids.index_select(0, keep)
    y = w.backbone_output(w.factor_mm(w.backbone_input(rows.float()), ids))
    if keep is not None:
        y = y.new_zeros(E * T, y.shape[-1]).index_copy_(0, keep, y)
    return y.to(w.dtype).view(E, T, -1)


@implements(aten.bmm.default)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    if not isinstance(w, MoBiETensor) or isinstance(x, MoBiETensor) or x.dim() != 3:
        raise NotImplementedError("MoBiETensor: only bmm(x [E, T, in], packed weight [E, in, out]) is supported")
    return packed_bmm(x, w)


@implements([aten.t.default])
def _(func, types, args, kwargs):
    raise NotImplementedError("MoBiETensor is 3D; .t() is undefined")


@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    raise NotImplementedError("MoBiETensor holds a 3D experts weight; select an expert before F.linear")


def _grouped_mm_fallback_on_packed(func, types, args, kwargs):
    x, w = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs["offs"]
    return packed_grouped_mm(x, w, offs)


def register_grouped_mm_fallback() -> None:
    """Teach :class:`MoBiETensor` transformers' ``grouped_mm_fallback`` op (its grouped_mm path under
    torch.compile for non-bf16 weights), when this transformers has it."""
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if op is not None:
        MoBiETensor.implements(op.default)(_grouped_mm_fallback_on_packed)
