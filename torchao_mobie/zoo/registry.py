"""Finding and loading the committed zoo checkpoints (local files only: nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from .specs import DEFAULT_MODEL, ZOO

ZOO_DIR = Path(__file__).resolve().parent / "models"


def zoo_path(name: str) -> Path:
    if name not in ZOO:
        raise ValueError(f"zoo model {name!r} is not known; expected one of {sorted(ZOO)}")
    p = ZOO_DIR / name
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"zoo checkpoint {name!r} is missing at {p}; "
                                f"train it with `python -m torchao_mobie.zoo.train {name}`")
    return p


def available() -> list[str]:
    return [n for n in ZOO if (ZOO_DIR / n / "model.safetensors").is_file()]


def load_zoo_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                   experts_implementation: str = "grouped_mm"):
    """(model, tokenizer) of a zoo checkpoint, in eval mode, weights cast to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts_implementation)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
