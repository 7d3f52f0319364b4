"""Bit packing of ±1 signs: the word format the packed tensor stores and every kernel reads.

Layout (gemlite-style word format): 32 consecutive signs along the packed dimension go into one int32
word, **LSB first**: bit ``i`` of word ``w`` holds element ``32*w + i``; a set bit means ``+1``, a clear
bit ``-1``. When the packed dimension is not a multiple of 32 the last word is padded with clear bits;
:func:`unpack_signs` always slices back to the logical length, so padding is never read as data.
int32 (not uint32) because that is what Triton and the torch bit ops read natively; the sign bit of
the word is just bit 31.
"""

from __future__ import annotations

import torch

__all__ = ["PACK_WIDTH", "packed_length", "pack_signs", "salient_slot_index", "unpack_bits", "unpack_signs"]

PACK_WIDTH = 32  # signs per int32 word


def packed_length(n: int) -> int:
    """Words needed for ``n`` signs (``ceil(n / 32)``)."""
    return (int(n) + PACK_WIDTH - 1) // PACK_WIDTH


def _shifts(device) -> torch.Tensor:
    return torch.arange(PACK_WIDTH, device=device, dtype=torch.int32)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack ``signs [..., n]`` (any dtype; ``> 0`` is +1, everything else -1) along the last dim.

    Returns int32 ``[..., ceil(n/32)]``. Signs must be exactly ±1 (or 0 for "absent" planes, which
    packs as -1 and is expected to be multiplied by a zero scale).
    """
    n = signs.shape[-1]
    nw = packed_length(n)
    bits = (signs > 0).to(torch.int64)
    pad = nw * PACK_WIDTH - n
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*signs.shape[:-1], nw, PACK_WIDTH)
    words = (bits << _shifts(signs.device).to(torch.int64)).sum(-1)  # in [0, 2^32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement wrap into int32
    return words.to(torch.int32).contiguous()


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """``words [..., nw]`` int32 -> bits ``[..., n]`` as uint8 {0, 1} (padding dropped)."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed signs must be int32 words, got {words.dtype}")
    nw = words.shape[-1]
    if n > nw * PACK_WIDTH:
        raise ValueError(f"cannot unpack {n} signs from {nw} words ({nw * PACK_WIDTH} bits)")
    bits = (words.unsqueeze(-1) >> _shifts(words.device)) & 1
    return bits.reshape(*words.shape[:-1], nw * PACK_WIDTH)[..., :n].to(torch.uint8)


def unpack_signs(words: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``words [..., nw]`` int32 -> signs ``[..., n]`` in ``dtype`` (exactly ±1)."""
    bits = unpack_bits(words, n)
    return (bits.to(dtype) * 2 - 1)


def salient_slot_index(salient: torch.Tensor, s: int) -> torch.Tensor:
    """``[..., s]`` columns of the salient plane's slots from the bitmap ``salient [..., n]`` (bool): the first
    ``s`` entries of ``stable_argsort(~salient)``, i.e. the salient columns ascending, then fillers."""
    return torch.argsort((~salient).to(torch.int8), dim=-1, stable=True)[..., :s]
