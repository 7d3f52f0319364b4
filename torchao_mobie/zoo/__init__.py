"""Reference zoo: small MoE language models of real transformers families, trained here on WikiText-2."""

from .registry import ZOO_DIR, available, heldout_dir, load_zoo_model, zoo_path
from .specs import DEFAULT_MODEL, HELDOUT, ZOO, ZooSpec

__all__ = ["DEFAULT_MODEL", "HELDOUT", "ZOO", "ZOO_DIR", "ZooSpec", "available", "heldout_dir", "load_zoo_model",
           "zoo_path"]
