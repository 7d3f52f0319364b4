"""Binarization algorithms: pure PyTorch functions of a weight matrix and a Hessian, device-agnostic."""

from .arb import arb_quantize
from .billm import billm_quantize, saliency, search_salient_columns, search_split_threshold, split_candidates
from .binarize import Binarized, arb_binarize, arb_rc_binarize, residual_binarize, sign_binarize, sign_quantize
from .cejd import cejd_quantize, reconstruct as cejd_reconstruct
from .fp_target import fp_target_weight
from .hbllm import hbllm_quantize
from .compensation import inverse_hessian_factor, quantize_blockwise
from .nges import router_metric, routing_projector
from .result import BinarizedWeight, BitBudget

__all__ = [
    "BinarizedWeight",
    "BitBudget",
    "Binarized",
    "arb_binarize",
    "arb_quantize",
    "arb_rc_binarize",
    "billm_quantize",
    "cejd_quantize",
    "cejd_reconstruct",
    "fp_target_weight",
    "hbllm_quantize",
    "inverse_hessian_factor",
    "quantize_blockwise",
    "residual_binarize",
    "router_metric",
    "routing_projector",
    "saliency",
    "search_salient_columns",
    "search_split_threshold",
    "sign_binarize",
    "sign_quantize",
    "split_candidates",
]
