"""Reference zoo: small MoE language models of real transformers families, trained here on WikiText-2."""

from .registry import ZOO_DIR, available, load_zoo_model, zoo_path
from .specs import DEFAULT_MODEL, ZOO, ZooSpec

__all__ = ["DEFAULT_MODEL", "ZOO", "ZOO_DIR", "ZooSpec", "available", "load_zoo_model", "zoo_path"]
