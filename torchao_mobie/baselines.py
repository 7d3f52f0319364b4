"""Baseline binarization configs: the published 1-bit PTQ methods MoBiE is compared with.

All are fake-quant, always (dequantized weights written back in the original dtype; no memory saved; they
have no packed format and no ``packed`` switch, unlike :class:`~torchao_mobie.mobie.MoBiEConfig`); the
storage a packed format would need is reported in both bit conventions. Each is a plain torchao
``AOBaseConfig`` dataclass with validation that calls its algorithm (:mod:`torchao_mobie.algorithms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import algorithms
from .methods.base import BinarizationConfig, BinarizedExperts, check_int

__all__ = ["SignBinaryConfig", "BiLLMConfig", "ARBLLMConfig", "HBLLMConfig"]


@dataclass
class SignBinaryConfig(BinarizationConfig):
    """Naive per-row sign binarization ``Ŵ = α·sign(W − μ) + μ`` (mean, mean-abs scale): the floor.

    Ignores the Hessian. Fake-quant (dequantized weights stored in the original dtype). Bits: 1 sign bit
    per weight (``paper_bits`` = 1.0); ``all_inclusive_bits`` adds 2 fp16 statistics per row.
    """

    def binarize_matrix(self, W, H):
        return algorithms.sign_quantize(W, H)


@dataclass
class BiLLMConfig(BinarizationConfig):
    """BiLLM (Huang et al., ICML 2024): salient columns with two residual binary planes, bell-shaped
    split of the rest into two groups, block-wise OBC error compensation with the Hessian.

    Fake-quant (dequantized weights stored in the original dtype; no memory saved). ``paper_bits``
    follows the paper's convention (sign planes + bitmaps, ~1.1 bits); ``all_inclusive_bits`` adds the
    fp16 per-row, per-block means and scales.

    salient_metric: "hessian" (``w² / [H⁻¹]_jj²``, the published scripts) or "magnitude".
    """

    salient_metric: str = "hessian"

    def __post_init__(self):
        super().__post_init__()
        if self.salient_metric not in ("hessian", "magnitude"):
            raise ValueError(f"BiLLMConfig.salient_metric must be 'hessian' or 'magnitude', got {self.salient_metric!r}")

    def binarize_matrix(self, W, H):
        return algorithms.billm_quantize(W, H, blocksize=self.blocksize, percdamp=self.percdamp,
                                            salient_metric=self.salient_metric)


@dataclass
class ARBLLMConfig(BinarizationConfig):
    """ARB-LLM (Li et al., ICLR 2025): alternating refined binarization on BiLLM's partition.

    Fake-quant (dequantized weights stored in the original dtype; no memory saved).

    variant: "arb" (alternating μ/α/B updates), "x" (ARB-X: calibration-aware refinement with the
    Hessian; the default, ARB-LLM_X with ``cgb=True``), "rc" (ARB-RC: row-and-column scales, no mean).
    cgb: column-group bitmap (salient columns split in two order-2 groups; no extra bits counted).
    iters: alternating refinement iterations (15 in the paper).

    Fake-quant (dequantized weights stored in the original dtype; no memory saved). Bits as
    :class:`BiLLMConfig`: ``paper_bits`` = sign planes + bitmaps, ``all_inclusive_bits`` adds the fp16
    row (and, for "rc", column) statistics.
    """

    variant: str = "x"
    cgb: bool = True
    iters: int = 15

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("arb", "x", "rc"):
            raise ValueError(f"ARBLLMConfig.variant must be one of 'arb', 'x', 'rc', got {self.variant!r}")
        if not isinstance(self.cgb, bool):
            raise ValueError(f"ARBLLMConfig.cgb must be a bool, got {self.cgb!r}")
        check_int("ARBLLMConfig", "iters", self.iters, 0)

    def binarize_matrix(self, W, H):
        return algorithms.arb_quantize(W, H, variant=self.variant, cgb=self.cgb, iters=self.iters,
                                          blocksize=self.blocksize, percdamp=self.percdamp)


@dataclass
class HBLLMConfig(BinarizationConfig):
    """HBLLM (Chen, Ye, Jiang, NeurIPS 2025): BiLLM's pipeline on Haar wavelet bands.

    Fake-quant (dequantized weights stored in the original dtype; no memory saved).

    Salient columns by the l2 norm of the Hessian saliency (structural search), salient columns
    filled from their neighbours, a row-wise Haar transform whose low and high bands are each
    binarized with a per-row two-group split (mean + RMS scale per group), the salient residual
    binarized on column-wise Haar bands, block-wise OBC compensation
    (:mod:`torchao_mobie.algorithms.hbllm`). Experts of a projection are binarized in one call.

    haar: "row" (published ``row-hbraq``, the default) or "col" (``col-hbraq``).
    group_partition: "row" (one split threshold per row, the default) or "global" (one per band).
    salient_metric: "l2" (the published README setting) or "l1" (BiLLM's column ranking).
    salient_up_lim: the structural search tries 1 .. up_lim-1 salient columns per block.

    Defaults are the published README's LLaMA setting (row-hbraq, l2, row, block 128, damping 0.01).
    Needs an even number of output rows and of columns per block. Bits: ``paper_bits`` = sign planes +
    salient-column bitmap (1 + k/C + 1/R); ``all_inclusive_bits`` adds a split-group bit per
    coefficient and the fp16 mean and scale per (band, row, group): about 3.6 at block 128.
    """

    haar: str = "row"
    group_partition: str = "row"
    salient_metric: str = "l2"
    salient_up_lim: int = 50

    def __post_init__(self):
        super().__post_init__()
        for field_name, allowed in (("haar", ("row", "col")), ("group_partition", ("row", "global")),
                                    ("salient_metric", ("l2", "l1"))):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"HBLLMConfig.{field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        check_int("HBLLMConfig", "salient_up_lim", self.salient_up_lim, 2)

    def _kwargs(self):
        return dict(haar=self.haar, group_partition=self.group_partition, salient_metric=self.salient_metric,
                    salient_up_lim=self.salient_up_lim, blocksize=self.blocksize, percdamp=self.percdamp)

    def binarize_matrix(self, W, H):
        return algorithms.hbllm_quantize(W, H, **self._kwargs())

    def quantize_experts(self, W3d, H3d, *, context=None):
        """Every expert of the projection in one vectorized call (``[E, out, in]``)."""
        self._check_expert_shapes(W3d, H3d)
        name = context.name if context is not None and context.name else "experts"
        res = algorithms.hbllm_quantize(W3d.float(), H3d.float(), name=name, **self._kwargs())
        return BinarizedExperts(res.weight, res.bits)
