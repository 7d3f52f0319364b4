"""Packed 1-bit storage of MoBiE experts (real memory savings; every other config is fake-quant).

* :class:`MoBiETensor` (:mod:`.mobie_tensor`) — one torchao tensor subclass per fused ``[E, out, in]`` experts
  weight; :mod:`.mobie_ops` — its aten dispatch table (transformers' generic experts paths);
* :func:`pack_model` (:mod:`.packed_model`, :mod:`.convert`) — MoBiE's stored form into packed parameters;
* :func:`memory_report` — bytes as stored vs. bf16 and vs. the bit accounting;
* :func:`save_quantized` / :func:`load_quantized` (:mod:`.checkpoint`, format :mod:`.serialization`) — the
  safetensors round trip (format version, checksums); ``save_pretrained`` / ``from_pretrained`` work
  through the ``"mobie"`` HF quantizer (:mod:`.hf_quantizer`, registered by ``import torchao_mobie``).
"""

from ..kernels.packing import PACK_WIDTH, pack_signs, packed_length, unpack_bits, unpack_signs
from .checkpoint import load_quantized, save_quantized
from .convert import binarize_experts_data_free, is_packed, pack_experts, unpack_model
from .memory import MemoryReport, memory_report, tensor_bytes
from .mobie_tensor import MoBiETensor
from .packed_model import pack_model
from .serialization import FORMAT_VERSION, READABLE_VERSIONS, MoBiECheckpointError, read_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "MemoryReport",
    "MoBiECheckpointError",
    "MoBiETensor",
    "PACK_WIDTH",
    "binarize_experts_data_free",
    "is_packed",
    "load_quantized",
    "memory_report",
    "pack_experts",
    "pack_model",
    "pack_signs",
    "packed_length",
    "read_checkpoint",
    "save_quantized",
    "tensor_bytes",
    "unpack_bits",
    "unpack_model",
    "unpack_signs",
]
