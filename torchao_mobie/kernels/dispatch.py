"""The one place that decides which kernels run on packed MoBiE experts.

Both entry points of a packed weight go through here: :func:`factor_mm` (the binary factors of
``MoBiETensor.factor_mm`` and of transformers' ``grouped_mm`` path) and :func:`moe_experts` (a whole fused
experts block: the ``"mobie"`` experts implementation), so a packed checkpoint loaded with
``from_pretrained`` on a GPU runs the Triton kernels with no extra call. The rule (:func:`choose_backend`):

* ``"triton"`` for CUDA tensors when Triton imports and no weight has further full planes (the kernels
  hold one full plane and the salient plane);
* ``"cpu"`` for CPU tensors once a compiled CPU backend is registered in :data:`BACKENDS` (its
  ``extra_planes`` says whether it takes weights with further full planes);
* ``"reference"`` (plain PyTorch, :mod:`.reference`) otherwise: every layout, every device.

A backend without a whole-block kernel (or a layout that kernel does not cover: biases, a post-expert norm,
a gating other than ``act(gate) * up``) runs the reference block forward with the backend's factor
product. :func:`use_backend` forces a choice (tests, benchmarks; the Triton interpreter on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from . import cpu
from .fused import moe_binary_triton, triton_available, triton_error, triton_factor_mm, triton_usable
from .reference import ACTIVATIONS, moe_binary_reference, reference_factor_mm

__all__ = ["BACKENDS", "KernelBackend", "PackedExpertsWeight", "backend_for", "choose_backend", "factor_mm",
           "fused_moe_binary", "moe_experts", "use_backend"]


@runtime_checkable
class PackedExpertsWeight(Protocol):
    """What the kernels read from a packed weight (:class:`~torchao_mobie.storage.MoBiETensor`)."""

    qdata: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    side: str

    def scales(self): ...

    def backbone_input(self, x): ...

    def backbone_output(self, z): ...


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of the packed experts' products.

    factor_mm: ``(w, x [S, n], expert_ids [S]) -> [S, m]`` fp32, ``Q_{e_i} x_i`` per row.
    moe: ``(hidden, top_k_index, top_k_weights, gate_up, down, *, has_gate, activation) -> [T, H]``, a whole
        experts block without biases or post-expert norm, or None (the reference block with ``factor_mm``).
    extra_planes: it also runs weights with further full binary planes (``MoBiETensor.extra_planes > 0``).
    backbone_input / backbone_output: ``(w, x) -> S x`` / ``(w, z) -> M z`` in the reference block (None: the
        weight's own methods).
    usable: a condition on the activations the backend also needs (e.g. running inside a compile trace);
        None: always, once the rule picks it.
    """

    factor_mm: Callable
    moe: Callable | None = None
    extra_planes: bool = False
    backbone_input: Callable | None = None
    backbone_output: Callable | None = None
    usable: Callable[[torch.Tensor], bool] | None = None


BACKENDS: dict[str, KernelBackend | None] = {
    "triton": KernelBackend(factor_mm=triton_factor_mm, moe=moe_binary_triton),
    # the compiled CPU path (issue 19): torch ops that inductor fuses, only inside a compile trace on CPU
    "cpu": KernelBackend(factor_mm=cpu.cpu_factor_mm, backbone_input=cpu.cpu_backbone_input,
                         backbone_output=cpu.cpu_backbone_output, usable=cpu.use_cpu_path, extra_planes=True),
    "reference": KernelBackend(factor_mm=reference_factor_mm, extra_planes=True),
}

_FORCED: str | None = None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run every packed-experts product in ``with`` on backend ``name`` (None: the automatic choice)."""
    global _FORCED
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {sorted(BACKENDS)}")
    if name is not None and BACKENDS[name] is None:
        raise ValueError(f"kernel backend {name!r} is not available in this build")
    old, _FORCED = _FORCED, name
    try:
        yield
    finally:
        _FORCED = old


def _extra_planes(weights) -> bool:
    return any(getattr(w, "qdata_x", None) is not None for w in weights)


def backend_for(device_type: str, extra_planes: bool) -> str:
    """The rule: the device's fast backend when it is there and holds the weights' planes, else the reference."""
    fast = {"cuda": "triton", "cpu": "cpu"}.get(device_type)
    backend = None if fast is None else BACKENDS[fast]
    if backend is None or (extra_planes and not backend.extra_planes):
        return "reference"
    if fast == "triton" and not triton_available():
        return "reference"
    return fast


def choose_backend(x: torch.Tensor, *weights) -> str:
    """The backend for activations ``x`` and packed ``weights`` (:func:`use_backend` overrides the rule)."""
    if _FORCED is not None:
        if _FORCED == "triton":
            _check_triton(x, weights, "use_backend('triton')")
        elif _extra_planes(weights) and not BACKENDS[_FORCED].extra_planes:
            raise NotImplementedError(f"use_backend({_FORCED!r}): this backend holds one full binary plane (plus the "
                                      "salient plane); these weights have more: use the reference backend")
        return _FORCED
    name = backend_for(x.device.type, _extra_planes(weights))
    usable = BACKENDS[name].usable
    return name if usable is None or usable(x) else "reference"


def _check_triton(x, weights, what: str) -> None:
    if _extra_planes(weights):  # further full planes: not in the kernels yet
        raise NotImplementedError(f"{what}: the Triton kernels hold one full binary plane (plus the salient plane); "
                                  "these weights have more (max_bits past two planes): use the reference backend")
    if not triton_usable(x):
        err = triton_error()
        raise RuntimeError(f"{what} needs triton and a CUDA tensor (or TRITON_INTERPRET=1)"
                           + (f"; triton import failed: {err}" if err else ""))


def factor_mm(w, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``Q_{e_i} x_i`` for every row of ``x [S, n]`` -> ``[S, m]`` fp32 on the chosen backend."""
    return BACKENDS[choose_backend(x, w)].factor_mm(w, x, expert_ids)


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up, down, *,
                has_gate: bool = True, activation: str | None = "silu", gate_fn=None, gate_up_bias=None,
                down_bias=None, post_norm=None) -> torch.Tensor:
    """Experts output ``[T, H]`` (``hidden.dtype``) of packed ``gate_up`` / ``down`` on the chosen backend.

    ``activation``: a name of :data:`~.reference.ACTIVATIONS` when the gating is ``act(gate) * up`` (or
    ``act`` without ``has_gate``), else None with ``gate_fn`` doing it; biases and ``post_norm`` as in
    :func:`~.reference.moe_binary_reference`.
    """
    backend = BACKENDS[choose_backend(hidden, gate_up, down)]
    plain = (activation in ACTIVATIONS and gate_up_bias is None and down_bias is None and post_norm is None)
    if backend.moe is not None and plain:
        return backend.moe(hidden, top_k_index, top_k_weights, gate_up, down, has_gate=has_gate, activation=activation)
    return moe_binary_reference(hidden, top_k_index, top_k_weights, gate_up, down, has_gate=has_gate,
                                activation=activation, gate_fn=gate_fn, gate_up_bias=gate_up_bias,
                                down_bias=down_bias, post_norm=post_norm, factor_mm=backend.factor_mm,
                                backbone_input=backend.backbone_input, backbone_output=backend.backbone_output)


def _check(gate_up, down, hidden, top_k_index, has_gate, activation):
    for name, w in (("gate_up", gate_up), ("down", down)):
        if not torch.compiler.is_compiling() and not isinstance(w, PackedExpertsWeight):
            raise TypeError(f"fused_moe_binary: {name} must be a packed MoBiE weight (MoBiETensor), got "
                            f"{type(w).__name__}")
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_moe_binary: hidden [T, H] and top_k_index [T, k] expected, got "
                         f"{list(hidden.shape)} and {list(top_k_index.shape)}")
    E, m1, H = gate_up.shape
    E2, H2, I = down.shape
    I_up = m1 // 2 if has_gate else m1
    if E2 != E or H2 != H or H != hidden.shape[1] or I_up != I:
        raise ValueError(f"fused_moe_binary: inconsistent shapes gate_up {list(gate_up.shape)}, down "
                         f"{list(down.shape)}, hidden {list(hidden.shape)} (has_gate={has_gate})")
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"fused_moe_binary: activation {activation!r} (supported: {list(ACTIVATIONS)})")


def fused_moe_binary(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up,
                     down, *, has_gate: bool = True, activation: str = "silu", path: str = "auto") -> torch.Tensor:
    """Experts output ``[T, H]`` of a fused MoBiE experts block (no bias; shared experts outside).

    ``gate_up``: MoBiETensor ``[E, 2I, H]`` (gate rows then up rows, ``has_gate``) or ``[E, I, H]``;
    ``down``: MoBiETensor ``[E, H, I]``; ``top_k_index [T, k]`` int, ``top_k_weights [T, k]``.
    ``path``: ``"auto"`` (:func:`choose_backend`), or force ``"gemv"`` / ``"gemm"`` (Triton decode / prefill
    kernels) or ``"reference"``.
    """
    _check(gate_up, down, hidden, top_k_index, has_gate, activation)
    if path == "auto":
        return moe_experts(hidden, top_k_index, top_k_weights, gate_up, down, has_gate=has_gate, activation=activation)
    if path == "reference":
        return moe_binary_reference(hidden, top_k_index, top_k_weights, gate_up, down, has_gate=has_gate,
                                    activation=activation)
    if path not in ("gemv", "gemm"):
        raise ValueError(f"fused_moe_binary: path must be auto|gemv|gemm|reference, got {path!r}")
    _check_triton(hidden, (gate_up, down), f"fused_moe_binary: path={path!r}")
    return moe_binary_triton(hidden, top_k_index, top_k_weights, gate_up, down, has_gate=has_gate,
                             activation=activation, path=path)
