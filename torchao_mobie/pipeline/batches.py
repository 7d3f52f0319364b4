"""Calibration input as the pipeline consumes it: batches of token ids (with an optional attention mask,
whose padded tokens are left out of every statistic), checked against the model before any work."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CalibrationBatch", "calibration_batches", "check_calibration"]


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    heldback: bool = False  # rows held back for choices judged out of sample (calibration.heldback)

    @property
    def token_mask(self) -> torch.Tensor | None:
        return None if self.attention_mask is None else self.attention_mask.reshape(-1).bool()

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())


def as_batch(item, device) -> CalibrationBatch:
    mask = None
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration dicts need an 'input_ids' entry, got keys {sorted(item)}")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids = item
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be integers, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration batches must be non-empty [batch, seqlen] token ids, got shape {list(ids.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(ids.shape).to(device)
    return CalibrationBatch(ids.long().to(device), mask)


def calibration_batches(calibration, batch_size: int, device) -> list[CalibrationBatch]:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            hint = (" (a token stream? cut it into samples with torchao_mobie.data.calibration_samples(ids, n_samples, "
                    "seqlen), or pass ids[None] for one sequence)" if calibration.dim() == 1 else "")
            raise ValueError(f"calibration must be a LongTensor [n_samples, seqlen] (2-D), got a {calibration.dim()}-D "
                             f"tensor of shape {list(calibration.shape)}{hint}")
        if calibration.shape[0] == 0 or calibration.shape[1] == 0:
            raise ValueError(f"calibration is empty: a tensor of shape {list(calibration.shape)}; expected "
                             "[n_samples, seqlen] with n_samples, seqlen >= 1")
        items = list(calibration.split(batch_size))
    elif isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
    else:
        raise TypeError(f"calibration must be a LongTensor [n, seqlen], or an iterable of such batches or of dicts "
                        f"with 'input_ids', got {type(calibration).__name__}")
    batches = [as_batch(item, device) for item in items]
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def check_calibration(model: nn.Module, batches: list[CalibrationBatch]) -> None:
    """Token ids the embedding cannot look up, or sequences longer than the model's positions, would
    fail deep inside the forward (or silently extrapolate rotary positions): refuse them up front."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    cfg = getattr(model, "config", None)
    vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    for i, b in enumerate(batches):
        ids = b.input_ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(
                f"calibration batch {i}: token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                f"[0, {vocab}); were the samples tokenized with this model's tokenizer?")
        if isinstance(max_pos, int) and ids.shape[1] > max_pos:
            raise ValueError(
                f"calibration batch {i}: sequences of {ids.shape[1]} tokens are longer than the model's context "
                f"(config.max_position_embeddings={max_pos}); use seqlen <= {max_pos}")
