"""What every subcommand shares: the error users can fix, argument types, loading models and text."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["CLIError", "REPORT_NAME", "PPL_CORPORA", "make_config"]

PPL_CORPORA = ("wikitext2", "ptb")
REPORT_NAME = "mobie_quantize.json"
DATA_HELP = ("folder with the corpora (laid out like shared/data); default: $MOBIE_DATA_DIR, then shared/data beside "
             "the checkout, then Hugging Face datasets")
MODEL_HELP = "Hugging Face checkpoint directory or zoo model name (`torchao-mobie zoo list`)"
DTYPE_HELP = ("dtype to load the weights in (float32: exact and fast on CPU; auto: the checkpoint's own)")


class CLIError(Exception):
    """A problem with the command's input, reported as ``error: <message>`` (no traceback)."""


def make_config(method: str, **kw):
    """The config of a method name (``name:key=value,...`` sets fields, see
    :func:`torchao_mobie.methods.registry.make_config`); a bad name or field exits with ``error: ...``."""
    from ..methods.registry import make_config as build

    try:
        return build(method, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def describe(*paragraphs: str) -> str:
    import textwrap

    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


def int_at_least(lo: int, what: str):
    """argparse type: an int >= ``lo`` (``what`` names the expectation in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def parse_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from e


def check_data_dir(data_dir) -> None:
    """Fail before loading a model: a typo in --data-dir should not cost a model load."""
    if data_dir is None:
        return
    d = Path(data_dir).expanduser()
    if not d.exists():
        raise CLIError(f"--data-dir {data_dir}: no such directory (expected a folder laid out like shared/data: "
                       "wikitext-2-raw/, wikitext-2/, ptb/)")
    if not d.is_dir():
        raise CLIError(f"--data-dir {data_dir}: is not a directory")
    if not os.access(d, os.R_OK | os.X_OK):
        raise CLIError(f"--data-dir {data_dir}: directory is not readable (permissions)")


def checkpoint_dir(spec: str, opt: str) -> Path:
    """Local checkpoint directory of ``spec`` (a directory or a zoo model name)."""
    from ..zoo import ZOO, zoo_path

    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CLIError(f"{opt} {spec}: is a file; expected a Hugging Face checkpoint directory (config.json + "
                           "*.safetensors) or a zoo model name")
        if not (p / "config.json").is_file():
            raise CLIError(f"{opt} {spec}: no config.json in this directory; expected a Hugging Face checkpoint "
                           "directory (config.json + *.safetensors)")
        return p.resolve()
    if spec in ZOO:
        try:
            return zoo_path(spec)
        except FileNotFoundError as e:
            raise CLIError(f"{opt} {spec}: {e}") from e
    raise CLIError(f"{opt} {spec}: no such directory, and not a zoo model name (zoo: {', '.join(ZOO)})")


def read_config(path: Path, opt: str, spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # unknown model_type, malformed JSON, ...
        raise CLIError(f"{opt} {spec}: cannot read {path / 'config.json'}: {e}") from e


def load_model(spec: str, opt: str, dtype: str, device, *, tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, checkpoint path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..storage import MoBiECheckpointError
    from ..zoo import ZOO, load_zoo_model

    path = checkpoint_dir(spec, opt)
    cfg = read_config(path, opt, spec)
    t = parse_dtype(dtype)
    try:
        if spec in ZOO and not Path(spec).expanduser().exists():
            if t == "auto":
                t = getattr(torch, str(getattr(cfg, "dtype", None) or "float32").replace("torch.", ""), torch.float32)
            model, tok = load_zoo_model(spec, dtype=t)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=t)
            tok = None
    except MoBiECheckpointError as e:
        raise CLIError(f"{opt} {spec}: {e}") from e
    except Exception as e:
        raise CLIError(f"{opt} {spec}: cannot load the checkpoint: {type(e).__name__}: {e}") from e
    if tokenizer and tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise CLIError(f"{opt} {spec}: no usable tokenizer in the checkpoint ({type(e).__name__}: {e}); text "
                           "cannot be tokenized") from e
    return model.to(device).eval(), tok, path


def max_positions(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    v = getattr(cfg, "max_position_embeddings", None)
    return v if isinstance(v, int) else None


def check_seqlen(opt: str, seqlen: int, cfg, what: str) -> None:
    max_pos = max_positions(cfg)
    if max_pos is not None and seqlen > max_pos:
        raise CLIError(f"{opt} {seqlen} is longer than the context of {what} (config.max_position_embeddings="
                       f"{max_pos}); use {opt} <= {max_pos}")


def check_token_ids(ids, model, opt: str, spec: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise CLIError(f"{opt} {spec}: its tokenizer produces token id {int(ids.max())}, outside the model's "
                       f"vocabulary [0, {vocab}); tokenizer and weights do not belong together")


def read_text(source: str, split: str, data_dir, opt: str) -> tuple[str, str]:
    """(text, description) of a corpus split or of a local text file."""
    from ..data import CORPORA, load_text

    if source in CORPORA:
        return load_text(source, split, data_dir), f"{source}/{split}"
    p = Path(source).expanduser()
    if not p.exists():
        raise CLIError(f"{opt} {source}: not a known corpus ({', '.join(CORPORA)}) and no such file")
    if not p.is_file():
        raise CLIError(f"{opt} {source}: is not a file; expected a corpus name ({', '.join(CORPORA)}) or a UTF-8 "
                       "text file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{opt} {source}: cannot read it as UTF-8 text ({e})") from e
    if not text.strip():
        raise CLIError(f"{opt} {source}: the file is empty")
    return text, str(p.resolve())


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def mb(nbytes) -> str:
    return f"{nbytes / 1e6:.3f} MB"
