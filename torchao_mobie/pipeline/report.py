"""What a quantization run leaves behind: a record per binarized parameter (on its module) and the
:class:`QuantizationReport` summed from them; the module attributes the pipeline uses are named here."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..algorithms.result import BitBudget
from ..calibration import FallbackEvent, RouterInputStats

__all__ = ["BinarizationRecord", "QuantizationReport", "records_of", "module_name"]

RECORDS = "_mobie_records"  # module attribute: {parameter name: BinarizationRecord}
OBSERVER = "_mobie_observer"  # module attribute: the statistics collector installed by step="observe"
ROUTER_STATS = "_mobie_router_stats"  # experts-module attribute left by a calibrated convert
NAME = "_mobie_name"  # module attribute: fqn, for messages from torchao handlers
KIND = "_mobie_kind"  # nn.Linear attribute: its Scope kind; untagged linears (lm_head, gates) are refused
OBSERVED_WITH = "_mobie_observed_with"  # module attribute: {parameter name: config of step="observe"}


@dataclass
class BinarizationRecord:
    """Left on a module for each binarized parameter (also what forbids binarizing it twice)."""

    config: str
    bits: BitBudget
    data_free: bool = False
    fallback_experts: list[int] = field(default_factory=list)


@dataclass
class QuantizationReport:
    """What a quantization run did.

    parameters: per binarized parameter fqn, its :class:`BitBudget`; ``bits`` sums them
        (``report.bits.paper_bits``, ``report.bits.all_inclusive_bits``).
    fallback_events: experts that used the layer-level Hessian (too few calibration tokens).
    router_stats: router-input moments per MoE block fqn (CPU tensors).
    data_free: parameters binarized without calibration statistics.
    """

    config: str = ""
    parameters: dict[str, BitBudget] = field(default_factory=dict)
    wall_time_s: float = 0.0
    fallback_events: list[FallbackEvent] = field(default_factory=list)
    router_stats: dict[str, RouterInputStats] = field(default_factory=dict)
    #: per router fqn, its :class:`~torchao_mobie.calibration.router_align.RouterAlignment` (logit error before
    #: and after, kept or not; ``MoBiEConfig.router_align``)
    router_alignment: dict[str, tuple] = field(default_factory=dict)
    data_free: list[str] = field(default_factory=list)
    calibration_tokens: int = 0

    @property
    def bits(self) -> BitBudget:
        total = BitBudget()
        for b in self.parameters.values():
            total = total + b
        return total

    def summary(self) -> str:
        b = self.bits
        n_fb = sum(len(e.experts) for e in self.fallback_events)
        return (f"{self.config}: {len(self.parameters)} parameters, {b.n_weights} weights, "
                f"{b.paper_bits:.4f} bits/weight (paper convention), {b.all_inclusive_bits:.4f} (all-inclusive), "
                f"{self.calibration_tokens} calibration tokens, {n_fb} expert fallbacks, "
                f"{len(self.data_free)} data-free, {self.wall_time_s:.1f} s")

    @classmethod
    def from_model(cls, model: nn.Module) -> "QuantizationReport":
        """Rebuild a report from the records left on a model's modules (e.g. after ``quantize_``)."""
        report = cls()
        configs = set()
        for fqn, module in model.named_modules():
            for pname, rec in getattr(module, RECORDS, {}).items():
                name = f"{fqn}.{pname}" if fqn else pname
                report.parameters[name] = rec.bits
                configs.add(rec.config)
                if rec.data_free:
                    report.data_free.append(name)
            stats = getattr(module, ROUTER_STATS, None)
            if stats is not None:
                report.router_stats[fqn.rsplit(".", 1)[0] if "." in fqn else fqn] = stats
        report.config = ",".join(sorted(configs))
        return report


def records_of(module: nn.Module) -> dict:
    recs = getattr(module, RECORDS, None)
    if recs is None:
        recs = {}
        setattr(module, RECORDS, recs)
    return recs


def module_name(module: nn.Module) -> str:
    return getattr(module, NAME, "") or type(module).__name__
