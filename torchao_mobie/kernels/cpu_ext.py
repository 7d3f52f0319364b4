"""The C++ sign products for packed experts on CPU (``csrc/sign_mm.cpp``), built on first use.

Why a C++ extension: inductor's fused loop for the binary GEMV (:mod:`.cpu`) expands each sign bit with
integer vector ops (shift, mask, xor, add: about five instructions per weight and activation row), which
left real-size decode compute-bound at 1.6x bf16 and prefill at 0.48x (``benchmarks/results/cpu_decode.md``,
first run). Here the sign bits are never expanded: with AVX-512, each nibble of sign bits indexes a 16-entry
table of signed partial sums of the activations (T-MAC style lookup tables, exact in fp32), 16 output rows per
``vpermps``; the salient plane's bits, stored along the output dim, are first transposed by ``gf2p8affine``
(GFNI; without it, masked adds). The rest of the factor product (scale decoding, gathers, the salient slots,
the backbones) stays in torch ops that inductor fuses around these two opaque calls.

Built with ``torch.utils.cpp_extension.load`` (``-O3 -march=native``, OpenMP through torch's own runtime)
into torch's extensions cache the first time a packed CPU forward runs (about 10 s); a C++ compiler and ninja
are needed (the ``ninja`` package is a dependency). It is used only when the build has AVX-512; otherwise,
or when the build fails (a warning says why), the inductor path runs. ``MOBIE_CPU_EXT=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

__all__ = ["ext_available", "ext_error", "sign_mm", "sign_mm_t", "ENV_DISABLE_EXT"]

ENV_DISABLE_EXT = "MOBIE_CPU_EXT"
_SRC = Path(__file__).with_name("csrc") / "sign_mm.cpp"
_ERROR: str | None = None


def _register_fakes() -> None:
    @torch.library.register_fake("mobie_cpu::sign_mm")
    def _(x, words, ids):
        return x.new_empty((x.shape[0], words.shape[1]))

    @torch.library.register_fake("mobie_cpu::sign_mm_t")
    def _(v, words, ids, m):
        return v.new_empty((v.shape[0], m))


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    global _ERROR
    if os.environ.get(ENV_DISABLE_EXT, "1") == "0":
        _ERROR = f"{ENV_DISABLE_EXT}=0"
        return False
    try:
        if not hasattr(torch.ops.mobie_cpu, "sign_mm"):
            from torch.utils import cpp_extension

            cpp_extension.load(name="mobie_cpu_sign_mm", sources=[str(_SRC)], is_python_module=False,
                               extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                               verbose=False)
            _register_fakes()
        if not torch.ops.mobie_cpu.has_avx512():
            _ERROR = "built without AVX-512 (this CPU lacks it): the inductor path is faster here"
            return False
        return True
    except Exception as e:  # no compiler / ninja, or a build error: the inductor path runs instead
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [""]
        _ERROR = f"{type(e).__name__}: {lines[0][:300]}"  # the first compiler error, not the whole log
        warnings.warn(f"torchao_mobie: the C++ CPU kernels could not be built ({_ERROR}); packed experts use the "
                      "slower torch.compile path on CPU", RuntimeWarning, stacklevel=3)
        return False


@torch.compiler.assume_constant_result
def ext_available() -> bool:
    """True once the C++ sign products are built and use AVX-512 (builds them on the first call)."""
    return _load()


def ext_error() -> str | None:
    """Why the C++ sign products are not used (None when they are, or before the first attempt)."""
    return _ERROR


def sign_mm(x: torch.Tensor, words: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[i, r] = Σ_j s[ids[i], r, j] x[i, j]``: ``x [S, 32 nw]`` fp32 (zero padded), ``words [E, m, nw]``
    int32 signs along the reduction dim (bit set = +1); rows sorted by expert (up to 8 a chunk) share each
    loaded word."""
    return torch.ops.mobie_cpu.sign_mm(x.contiguous(), words.contiguous(), ids.contiguous())


def sign_mm_t(v: torch.Tensor, words: torch.Tensor, ids: torch.Tensor, m: int) -> torch.Tensor:
    """``out[i, r] = Σ_t s[ids[i], t, r] v[i, t]`` for ``r < m``: ``v [S, s]`` fp32, ``words [E, s, mw]`` int32
    signs along the output dim (the salient plane)."""
    return torch.ops.mobie_cpu.sign_mm_t(v.contiguous(), words.contiguous(), ids.contiguous(), m)
