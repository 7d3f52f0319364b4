"""Binarization algorithms: pure PyTorch functions of a weight matrix and a Hessian, device-agnostic."""

from .result import BinarizedWeight, BitBudget

__all__ = ["BinarizedWeight", "BitBudget"]
