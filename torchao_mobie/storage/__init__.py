"""Packed 1-bit storage of MoBiE experts (real memory savings; every other config is fake-quant).

* :class:`MoBiETensor` — one torchao tensor subclass per fused ``[E, out, in]`` experts weight;
* :func:`pack_model` — turn MoBiE's explicit representation into packed parameters;
* :func:`memory_report` — bytes as stored vs. bf16 and vs. the bit accounting;
* :func:`save_quantized` / :func:`load_quantized` — safetensors round trip (format version, checksums);
  ``save_pretrained`` / ``from_pretrained`` work through the registered ``"mobie"`` HF quantizer.
"""

from ..integrations import experts as _experts
from ..integrations import hf_quantizer as _hf  # noqa: F401  (registers the "mobie" HF quantizer)
from .convert import binarize_experts_data_free, is_packed, pack_experts, pack_model, unpack_model
from .memory import MemoryReport, memory_report, tensor_bytes
from .mobie_tensor import MoBiETensor
from .packing import PACK_WIDTH, pack_signs, packed_length, unpack_bits, unpack_signs
from .serialization import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    MoBiECheckpointError,
    load_quantized,
    read_checkpoint,
    save_quantized,
)

_experts.register_experts_implementation()

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
