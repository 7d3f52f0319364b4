"""Memory as stored vs. the bit accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..algorithms.result import BitBudget
from ..integrations.transformers import PROJECTIONS, is_experts_module
from .mobie_tensor import MoBiETensor

__all__ = ["MemoryReport", "memory_report", "tensor_bytes"]


def tensor_bytes(t) -> int:
    """Bytes really held by a (possibly packed) tensor."""
    if isinstance(t, MoBiETensor):
        return t.storage_bytes()
    return t.numel() * t.element_size()


@dataclass
class MemoryReport:
    """Bytes of a model as stored.

    experts_bytes: expert weights as stored (packed tensors: every packed word, scale, bitmap and
        backbone byte; plain tensors: numel × element size).
    experts_bf16_bytes: the same weights in bf16 (2 bytes per logical weight).
    experts_budget_bytes: the all-inclusive bit accounting of the packed weights / 8, plus the plain
        ones; ``experts_padding_bytes`` is the difference due to 32-bit word rounding.
    model_bytes / model_bf16_bytes: every parameter and persistent buffer (shared tensors counted once);
        the bf16 figure counts every floating weight (packed ones by their logical size) at 2 bytes.
    experts_sign_bytes / experts_scale_bytes / experts_backbone_bytes / experts_plain_bytes: the split of
        ``experts_bytes`` into packed sign words and bitmaps, fp16 scales and means, shared backbones
        (with their row scales), and expert weights that are not packed (full precision or fake-quant).
    """

    experts_bytes: int = 0
    experts_bf16_bytes: int = 0
    experts_budget_bytes: float = 0.0
    experts_padding_bytes: float = 0.0
    experts_weights: int = 0
    packed_parameters: int = 0
    model_bytes: int = 0
    model_bf16_bytes: int = 0
    experts_sign_bytes: int = 0
    experts_scale_bytes: int = 0
    experts_backbone_bytes: int = 0
    experts_plain_bytes: int = 0

    @property
    def rest_bytes(self) -> int:
        """Everything but the expert weights (attention, routers, embeddings, norms), as stored."""
        return self.model_bytes - self.experts_bytes

    @property
    def rest_bf16_bytes(self) -> int:
        return self.model_bf16_bytes - self.experts_bf16_bytes

    def components(self) -> dict[str, int]:
        """Bytes per component as stored (they sum to ``model_bytes``)."""
        return {"experts signs + bitmaps": self.experts_sign_bytes, "experts scales": self.experts_scale_bytes,
                "experts backbone": self.experts_backbone_bytes, "experts (not packed)": self.experts_plain_bytes,
                "rest of model": self.rest_bytes}

    @property
    def experts_ratio(self) -> float:
        return self.experts_bytes / max(1, self.experts_bf16_bytes)

    @property
    def model_ratio(self) -> float:
        return self.model_bytes / max(1, self.model_bf16_bytes)

    @property
    def experts_bits_per_weight(self) -> float:
        return 8 * self.experts_bytes / max(1, self.experts_weights)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(experts_ratio=round(self.experts_ratio, 5), model_ratio=round(self.model_ratio, 5),
                 experts_bits_per_weight=round(self.experts_bits_per_weight, 4), rest_bytes=self.rest_bytes,
                 rest_bf16_bytes=self.rest_bf16_bytes)
        return d


# stored tensors of a MoBiETensor -> MemoryReport component (anything else counts as a scale)
_COMPONENT = {"qdata": "experts_sign_bytes", "qdata2": "experts_sign_bytes", "qdata_x": "experts_sign_bytes",
              "salient": "experts_sign_bytes",
              "backbone": "experts_backbone_bytes", "backbone_scale": "experts_backbone_bytes"}


def memory_report(model: nn.Module) -> MemoryReport:
    r = MemoryReport()
    budget = BitBudget()
    for _, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for proj in PROJECTIONS:
            t = getattr(module, proj, None)
            if t is None:
                continue
            r.experts_bytes += tensor_bytes(t)
            r.experts_bf16_bytes += 2 * t.numel()
            r.experts_weights += t.numel()
            if isinstance(t, MoBiETensor):
                for name, data in t.stored_tensors().items():
                    field_name = _COMPONENT.get(name, "experts_scale_bytes")
                    setattr(r, field_name, getattr(r, field_name) + data.numel() * data.element_size())
                budget = budget + t.bit_budget()
                r.experts_padding_bytes += t.padding_bits() / 8
                r.packed_parameters += 1
            else:
                r.experts_plain_bytes += tensor_bytes(t)
                budget = budget + BitBudget(n_weights=t.numel(), param_bits=8 * tensor_bytes(t))
    r.experts_budget_bytes = budget.stored_bits / 8
    non_persistent = set()  # e.g. rotary inv_freq: not part of the stored model
    for mod in model.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(name)
            if b is not None:
                non_persistent.add(id(b))
    seen = set()
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        if id(t) in non_persistent:
            continue
        key = id(t) if isinstance(t, MoBiETensor) else (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        r.model_bytes += tensor_bytes(t)
        floating = t.is_floating_point() or isinstance(t, MoBiETensor)
        r.model_bf16_bytes += 2 * t.numel() if floating else tensor_bytes(t)
    return r
