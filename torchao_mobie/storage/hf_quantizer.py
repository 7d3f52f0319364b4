"""Hugging Face ``save_pretrained`` / ``from_pretrained`` of packed MoBiE models.

Registers a quantization method ``"mobie"`` with transformers (``register_quantization_config`` +
``register_quantizer``): ``config.json`` carries ``{"quant_method": "mobie", "format_version": 2}`` (3 with
transposed packed parameters),
the weights file is the format of :mod:`torchao_mobie.storage.serialization` (flattened
``<module>._<param>_<data>`` tensors + JSON metadata with checksums). Our own quantizer declares its own
serialized names, so the field names are free (torchao's ``TorchAoConfig`` route only accepts the
suffixes qdata/scale/zero_point/...), and the torchao allow-lists need no patching.

Usage (``import torchao_mobie`` registers ``"mobie"``: :mod:`torchao_mobie.registrations`)::

    import torchao_mobie
    pack_model(model); model.save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)     # packed, experts_implementation="mobie"

Only pre-quantized checkpoints load (``requires_calibration``): quantizing while loading needs
calibration data, use :func:`torchao_mobie.quantize_model` for that.
"""

from __future__ import annotations

import json

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .serialization import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    CONVERTED_CHECKSUMS,
    MoBiECheckpointError,
    build_tensor,
    check_metadata,
    checksums,
    flatten_state_dict,
    format_version,
    stored_key,
    verify_file,
)

__all__ = ["MoBiEHfConfig", "MoBiEHfQuantizer", "attach_quantizer", "QUANT_METHOD", "set_experts_implementation"]

QUANT_METHOD = "mobie"
_DATA_NAMES = ["qdata", "row_scale", "col_scale", "backbone", "backbone_scale", "qdata2", "col_scale2", "salient",
               "mean", "scale_grid", "qdata_x", "col_scale_x"]


class MoBiEHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed MoBiE checkpoint.

    format_version: version of the packed tensor format (checked against the weights' metadata).
    experts_implementation: experts implementation set after loading ("mobie" = fused packed path).
    verify_checksums: check every tensor's crc32 before loading (reads the weights once more).
    """

    def __init__(self, format_version: int = FORMAT_VERSION, experts_implementation: str | None = "mobie",
                 verify_checksums: bool = True, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.experts_implementation = experts_implementation
        self.verify_checksums = bool(verify_checksums)
        if self.format_version not in READABLE_VERSIONS:
            raise MoBiECheckpointError(f"config.json: MoBiE format version {self.format_version} is not supported "
                                       f"(this torchao_mobie reads versions {', '.join(map(str, READABLE_VERSIONS))})")

    def to_dict(self):
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "experts_implementation": self.experts_implementation, "verify_checksums": self.verify_checksums}


class MoBiEDeserialize:
    """Load operation: the stored tensors of one packed parameter -> :class:`MoBiETensor`."""

    def __init__(self, hf_quantizer: "MoBiEHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    # ConversionOps protocol
    def convert(self, input_dict, source_patterns=None, model=None, full_layer_name=None, missing_keys=None,
                **kwargs):
        q = self.hf_quantizer
        desc = q.described.get(full_layer_name)
        fname = q.filename_of.get(full_layer_name, "<checkpoint>")
        if desc is None:
            raise MoBiECheckpointError(f"{fname}: no MoBiE metadata for {full_layer_name}")
        data = {}
        _, pname = full_layer_name.rsplit(".", 1)
        for suffix, tensors in input_dict.items():
            name = suffix.rsplit(".", 1)[-1].removeprefix(f"_{pname}_")
            t = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
            data[name] = t
        t = build_tensor(full_layer_name, desc, data, fname)
        module = model.get_submodule(full_layer_name.rsplit(".", 1)[0]) if model is not None else None
        if module is not None:
            module._is_hf_initialized = True
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {full_layer_name: t}

    @property
    def reverse_op(self):
        # transformers reverses every load operation of a model loaded with from_pretrained when it saves it
        # again; the packed parameters reach it already flattened (get_state_dict_and_metadata), so the
        # reversed converter (source pattern "<param>") never matches a stored "_<param>_<data>" key
        return MoBiESerialized()


class MoBiESerialized:
    """Reverse of :class:`MoBiEDeserialize` (save): a packed parameter that reaches it was not flattened."""

    def convert(self, input_dict, full_layer_name=None, **kwargs):
        raise MoBiECheckpointError(f"{full_layer_name}: a packed parameter reached transformers' save conversion "
                                   "unflattened; save packed models with save_pretrained or save_quantized")


class MoBiEHfQuantizer(HfQuantizer):
    """Loads and saves packed MoBiE checkpoints (see the module docstring)."""

    requires_calibration = True
    quantization_config: MoBiEHfConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.described: dict[str, dict] = {}
        self.filename_of: dict[str, str] = {}
        self.checksums: dict[str, int] = {}

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from safetensors import SafetensorError, safe_open

        present: set[str] = set()
        verify = getattr(self.quantization_config, "verify_checksums", True)
        files = [str(p) for p in (checkpoint_files or [])]
        for path in files:
            if not str(path).endswith(".safetensors"):
                raise MoBiECheckpointError(f"{path}: MoBiE checkpoints are safetensors files")
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
            except SafetensorError as e:
                raise MoBiECheckpointError(f"{path}: not a readable safetensors file ({e}); truncated or "
                                           "corrupted") from None
            check_metadata(meta, path)
            if verify:
                # HF turns errors inside load operations into a generic RuntimeError (details only in
                # its log report): verify here, where our error reaches the caller as is
                keys, sums = verify_file(path, require_all=False)
                present |= keys
                self.checksums.update(sums)
            # the model's names: the load operations see the keys after transformers' renaming
            described = json.loads(meta.get("mobie_tensors", "{}"))
            self.described.update(described)
            self.filename_of.update({k: str(path) for k in described})
        missing = sorted(set(self.checksums) - present) if verify else []
        if missing:
            raise MoBiECheckpointError(f"{', '.join(files)}: tensor {missing[0]} is missing (truncated or incomplete "
                                       "checkpoint)")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        set_experts_implementation(model, getattr(self.quantization_config, "experts_implementation", None))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: packed experts back to plain (fake-quant) parameters, bit-exact."""
        from .convert import unpack_model

        return unpack_model(model, dtype=dtype)

    @property
    def serialized_names(self):
        if not self.pre_quantized:
            return {}
        # one converter per packed parameter, by its full name: transformers matches these patterns anywhere in a
        # key, and on save reverses them, where a bare "down_proj" would also catch e.g. a plain
        # shared_expert.down_proj.weight (the converters see the keys after the model's renamings)
        return {fqn: [stored_key(fqn, n) for n in _DATA_NAMES] for fqn in sorted(self.described)}

    def get_load_operations(self):
        return {"deserialize": MoBiEDeserialize}

    def get_state_dict_and_metadata(self, model):
        tensors, meta = flatten_state_dict(model.state_dict())
        # transformers then reverts its checkpoint conversion mapping (renamings, per-expert splits) on these
        # tensors before writing them: checksum what it will write too, under the names it will write
        written = checksums(_as_transformers_writes(model, tensors))
        if written != json.loads(meta["mobie_checksums"]):
            meta[CONVERTED_CHECKSUMS] = json.dumps(written, sort_keys=True)
        return tensors, meta

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _as_transformers_writes(model, tensors: dict) -> dict:
    """``tensors`` as ``save_pretrained`` writes them (its default ``save_original_format=True``)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def set_experts_implementation(model, impl: str | None) -> bool:
    """``model.set_experts_implementation(impl)`` where the model's experts use transformers' experts interface;
    False (nothing set) for ``impl=None`` and for models whose experts do not (llama4: its packed experts run
    through :class:`MoBiETensor`'s ``bmm``, see :mod:`.mobie_ops`)."""
    if not impl or not hasattr(model, "set_experts_implementation"):
        return False
    can = getattr(type(model), "_can_set_experts_implementation", None)
    if can is not None and not can():
        return False
    model.set_experts_implementation(impl)
    return True


def attach_quantizer(model) -> None:
    """Mark a packed model as ``"mobie"``-quantized so ``save_pretrained`` writes the packed format (version 3
    when it holds a transposed packed parameter, else 2: :func:`~.serialization.format_version`)."""
    cfg = MoBiEHfConfig(format_version=format_version(model.parameters()))
    model.config.quantization_config = cfg
    q = MoBiEHfQuantizer(cfg, pre_quantized=True)
    model.hf_quantizer = q
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Register the ``"mobie"`` quantization method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoBiEHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoBiEHfQuantizer)
