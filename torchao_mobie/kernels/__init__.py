"""Kernels of packed MoBiE experts: the word format, the backends and the one dispatch between them.

* :mod:`.dispatch` — which backend runs (:func:`choose_backend`): Triton on CUDA, a compiled CPU path once
  registered, the PyTorch reference otherwise; :func:`fused_moe_binary` / :func:`moe_experts` (a whole
  experts block) and :func:`factor_mm` (the binary factors) are its entry points;
* :mod:`.reference` — the ±1 reference op ``torch.ops.mobie.binary_factor_mm`` and the one reference
  forward of an experts block;
* :mod:`.fused` (+ :mod:`.ops`, :mod:`.triton_kernels`, :mod:`.align`) — the Triton backend;
* :mod:`.packing` — 32 signs per int32 word, the format all of them read.

The kernels read a packed weight through its tensors and methods and never import the storage layer.
"""

from .align import max_padded_slots, moe_align_block_size
from .dispatch import (
    BACKENDS,
    KernelBackend,
    PackedExpertsWeight,
    choose_backend,
    factor_mm,
    fused_moe_binary,
    moe_experts,
    use_backend,
)
from .fused import GEMV_MAX_PAIRS, moe_binary_triton, salient_index_i32, triton_available, triton_usable
from .reference import moe_binary_dense_reference, moe_binary_reference

__all__ = ["BACKENDS", "GEMV_MAX_PAIRS", "KernelBackend", "PackedExpertsWeight", "choose_backend", "factor_mm",
           "fused_moe_binary", "max_padded_slots", "moe_align_block_size", "moe_binary_dense_reference",
           "moe_binary_reference", "moe_binary_triton", "moe_experts", "salient_index_i32", "triton_available",
           "triton_usable", "use_backend"]
