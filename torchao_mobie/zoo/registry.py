"""Finding and loading the committed zoo checkpoints (local files only: nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .specs import DEFAULT_MODEL, HELDOUT, ZOO

ZOO_DIR = Path(__file__).resolve().parent / "models"


def heldout_dir() -> Path:
    """Where held-out models live (not committed): ``$MOBIE_HELDOUT_DIR`` or ~/.cache/torchao_mobie/heldout."""
    env = os.environ.get("MOBIE_HELDOUT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "torchao_mobie" / "heldout"


def zoo_path(name: str) -> Path:
    if name in HELDOUT:
        p, how = heldout_dir() / name, f"python -m torchao_mobie.zoo.train --heldout {name}"
    elif name in ZOO:
        p, how = ZOO_DIR / name, f"python -m torchao_mobie.zoo.train {name}"
    else:
        raise ValueError(f"zoo model {name!r} is not known; expected one of {sorted(ZOO)} "
                         f"(held-out: {sorted(HELDOUT)})")
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"zoo checkpoint {name!r} is missing at {p}; train it with `{how}`")
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
