"""Corpora, calibration samples and evaluation windows.

One resolver finds text for every consumer (tests, benchmarks, CLI, zoo training): an explicit
``data_dir`` argument, else ``$MOBIE_DATA_DIR``, else a ``shared/data`` folder next to the checkout,
else Hugging Face ``datasets`` (online users). When nothing works the error lists every place tried,
so a missing corpus is never mistaken for an empty one.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CORPORA",
    "DataNotFoundError",
    "resolve_data_dir",
    "load_text",
    "tokenize_corpus",
    "calibration_samples",
    "calibration_set",
    "eval_windows",
]


class DataNotFoundError(FileNotFoundError):
    """No source could provide the requested corpus split; the message lists what was tried."""


@dataclass(frozen=True)
class _Split:
    local: tuple[str, ...]  # candidate paths relative to the data dir, first existing wins
    hf: tuple[str, str | None, str, str] | None  # (path, name, split, text column) for `datasets`


# Evaluation uses the raw text (what users feed models); training/calibration on WikiText-2 falls back
# to the tokenized release because the raw train split is not available offline here.
CORPORA: dict[str, dict[str, _Split]] = {
    "wikitext2": {
        "train": _Split(("wikitext-2-raw/wiki.train.raw", "wikitext-2/wiki.train.tokens"),
                        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text")),
        "validation": _Split(("wikitext-2-raw/wiki.valid.raw", "wikitext-2/wiki.valid.tokens"),
                             ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text")),
        "test": _Split(("wikitext-2-raw/wiki.test.raw", "wikitext-2/wiki.test.tokens"),
                       ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")),
    },
    "ptb": {
        "train": _Split(("ptb/ptb.train.txt",), ("ptb_text_only", "penn_treebank", "train", "sentence")),
        "validation": _Split(("ptb/ptb.valid.txt",), ("ptb_text_only", "penn_treebank", "validation", "sentence")),
        "test": _Split(("ptb/ptb.test.txt",), ("ptb_text_only", "penn_treebank", "test", "sentence")),
    },
    "c4": {
        "train": _Split(("c4/c4-train.00000-of-01024.json.gz", "c4/c4-train.txt"),
                        ("allenai/c4", "en", "train", "text")),
        "validation": _Split(("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-validation.txt"),
                             ("allenai/c4", "en", "validation", "text")),
    },
}


def _candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("MOBIE_DATA_DIR"):
        dirs.append(Path(os.environ["MOBIE_DATA_DIR"]))
    # A checkout laid out as <root>/main next to <root>/shared/data (this project's machines and CI).
    here = Path(__file__).resolve().parent.parent
    dirs += [here.parent / "shared" / "data", here / "shared" / "data"]
    return dirs


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing data directory among the configured candidates (None if none exists).

    An explicit ``data_dir`` that does not exist is an error, not a silent fallback.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"data_dir={str(data_dir)!r} is not a readable directory")
    for d in _candidate_dirs(data_dir):
        if d.is_dir():
            return d
    return None


def _read_local(path: Path) -> str:
    if path.suffix == ".gz":
        import gzip
        import json

        with gzip.open(path, "rt", encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f)
    return path.read_text(encoding="utf-8")


def load_text(corpus: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """Full text of a corpus split as one string (documents joined by blank lines, as the releases are)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not known; expected one of {sorted(CORPORA)}")
    if split not in CORPORA[corpus]:
        raise ValueError(f"split={split!r} is not available for corpus {corpus!r}; "
                         f"expected one of {sorted(CORPORA[corpus])}")
    spec = CORPORA[corpus][split]
    tried = []
    for d in _candidate_dirs(data_dir):
        for rel in spec.local:
            p = d / rel
            if p.is_file():
                return _read_local(p)
            tried.append(str(p))
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"data_dir={str(data_dir)!r} is not a readable directory")
    if spec.hf is not None:
        path, name, hf_split, column = spec.hf
        try:
            import datasets  # noqa: F401

            ds = datasets.load_dataset(path, name, split=hf_split)
            return "\n\n".join(ds[column]) if corpus == "c4" else "\n".join(ds[column])
        except Exception as e:  # offline, not installed, gated...
            tried.append(f"datasets.load_dataset({path!r}, {name!r}, split={hf_split!r}) -> {type(e).__name__}: "
                         f"{str(e)[:200]}")
    else:
        tried.append("Hugging Face datasets: no hub copy known")
    raise DataNotFoundError(
        f"could not find {corpus}/{split}. Tried:\n  " + "\n  ".join(tried)
        + "\nPass --data-dir / data_dir=, or set MOBIE_DATA_DIR to a folder laid out like shared/data.")


_TOKEN_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TOKEN_CACHE_SIZE = 4


def tokenize_corpus(text: str, tokenizer) -> torch.Tensor:
    """1-D LongTensor of the whole text's token ids (one pass, no special tokens), the GPTQ convention.

    The last few results are kept in memory (keyed by the text's digest and the tokenizer's identity):
    every method comparison and seed re-tokenizes the same 2 M-token training split otherwise (~17 s).
    """
    raw = hasattr(tokenizer, "encode") and not hasattr(tokenizer, "__call__")  # a raw `tokenizers.Tokenizer`
    backend = tokenizer if raw else getattr(tokenizer, "backend_tokenizer", None)
    key = None
    if backend is not None and hasattr(backend, "to_str"):  # the exact tokenization pipeline, as JSON
        key = (hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(),
               hashlib.sha1(backend.to_str().encode()).hexdigest())
        if key in _TOKEN_CACHE:
            _TOKEN_CACHE.move_to_end(key)
            return _TOKEN_CACHE[key].clone()
    ids = tokenizer.encode(text).ids if raw else tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    if key is not None:
        _TOKEN_CACHE[key] = out
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    return out.clone()


def calibration_samples(ids, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[n_samples, seqlen]`` random windows of a token stream, seeded (the GPTQ/BiLLM sampler).

    ``ids`` may also be a list of streams (a calibration mix, e.g. WikiText-2 + PTB): the windows are
    shared out evenly, the first streams taking the remainder, in stream order. MoBiE fits its 1.5-bit
    budget to the calibration domain closely, so a mix covers a model's domains better than one corpus.
    """
    streams = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if not streams or any(not isinstance(t, torch.Tensor) or t.dim() != 1 for t in streams):
        raise ValueError("ids must be a 1-D tensor of token ids or a non-empty list of them")
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise ValueError(f"seqlen must be a positive int, got {seqlen!r}")
    if n_samples < len(streams):
        raise ValueError(f"n_samples={n_samples} is fewer than the {len(streams)} calibration streams to mix")
    for i, t in enumerate(streams):
        if t.numel() <= seqlen:
            which = f"token stream {i} of the mix" if len(streams) > 1 else "the token stream"
            raise ValueError(f"{which} has {t.numel()} tokens, fewer than seqlen+1={seqlen + 1}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(streams):
        n = n_samples // len(streams) + (i < n_samples % len(streams))
        starts = torch.randint(0, t.numel() - seqlen, (n,), generator=g)
        out += [t[s : s + seqlen] for s in starts.tolist()]
    return torch.stack(out)


def calibration_set(calib: str, tokenizer, n_samples: int, seqlen: int, seed: int = 0,
                    data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Calibration windows from the train split of ``calib``: a corpus name or a mix such as
    ``"wikitext2+ptb"`` (windows shared evenly, see :func:`calibration_samples`)."""
    names = calib.split("+") if isinstance(calib, str) else None
    if not names or any(n not in CORPORA for n in names):
        raise ValueError(f"calib={calib!r}: expected a corpus name or names joined by '+' from {sorted(CORPORA)}")
    return calibration_samples([tokenize_corpus(load_text(n, "train", data_dir), tokenizer) for n in names],
                               n_samples, seqlen, seed)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows from the start of the stream (the tail is dropped)."""
    if not isinstance(seqlen, int) or seqlen <= 1:
        raise ValueError(f"seqlen must be an int > 1, got {seqlen!r}")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the token stream has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
