"""Offline document builders and scorers for the ``*_local`` lm-eval tasks in this folder.

lm-eval loads this file by path (the YAMLs refer to it as ``!function utils.NAME``); it is also importable as
``torchao_mobie.eval.lm_eval_tasks.utils``. Text comes from :func:`torchao_mobie.data.load_text`, so the data
directory follows the project resolver: an explicit ``data_dir`` (passed to lm-eval as task metadata), else
``$MOBIE_DATA_DIR``, else ``shared/data`` beside the checkout, else Hugging Face ``datasets`` when online.

Nothing here imports lm-eval; ``datasets`` is imported only to wrap the finished docs.
"""

from __future__ import annotations

import bisect
import random
import re

from torchao_mobie.data import load_text

# A WikiText article starts at a level-1 heading line `` = Title = `` (section headings are `` = = X = = ``).
# WikiText-2 raw test has 62 such lines (lm-eval's ``wikitext`` uses the same article-level documents).
_ARTICLE_HEADING = re.compile(r"^ ?= [^=].* = ?$")
_ANY_HEADING = re.compile(r"^=+ .* =+$")

PTB_LINES_PER_DOC = 50
MC_DEFAULTS = dict(n_docs=1000, context_words=40, continuation_words=15, seed=1234)


# ----------------------------------------------------------------------------------------------- wikitext

def split_wikitext_articles(text: str) -> list[dict]:
    """``[{"title", "page"}]``: the raw text cut at every level-1 ``" = Title = "`` heading line.

    ``page`` is the article's raw lines (heading included) joined by ``\\n``, trailing blank lines dropped;
    text before the first heading (a single blank line in the release) is dropped.
    """
    docs: list[dict] = []
    cur: list[str] | None = None
    for line in text.splitlines():
        if _ARTICLE_HEADING.match(line):
            if cur is not None:
                docs.append(_finish_article(cur))
            cur = [line]
        elif cur is not None:
            cur.append(line)
    if cur is not None:
        docs.append(_finish_article(cur))
    return docs


def _finish_article(lines: list[str]) -> dict:
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    return {"title": lines[0].strip().strip("=").strip(), "page": "\n".join(lines)}


def wikitext_detokenize(string: str) -> str:
    """Undo WikiText's Moses-style tokenization (the rules of lm-eval's ``wikitext`` task)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def wikitext_detokenizer(doc: dict) -> str:
    """doc_to_target of ``wikitext2_local``: the detokenized article."""
    return wikitext_detokenize(doc["page"])


def wikitext_word_count(page: str) -> int:
    # lm-eval's wikitext convention (kept for comparable numbers): words of the *raw* page, split on \s+.
    return len(re.split(r"\s+", page))


def wikitext_process_results(doc: dict, results) -> dict:
    (loglikelihood,) = results
    words = wikitext_word_count(doc["page"])
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}


def wikitext_documents_list(split: str = "test", data_dir=None) -> list[dict]:
    return split_wikitext_articles(load_text("wikitext2", split, data_dir))


# ----------------------------------------------------------------------------------------------- PTB

def ptb_documents_list(split: str = "test", data_dir=None, lines_per_doc: int = PTB_LINES_PER_DOC) -> list[dict]:
    """Consecutive chunks of ``lines_per_doc`` PTB sentences (the LM release has no article boundaries).

    ``text`` is the stripped sentences, each followed by ``\\n`` (the newline plays PTB's ``<eos>``), and
    ``n_words`` counts whitespace words plus one ``<eos>`` per sentence: the classic PTB word-level count,
    so ``word_perplexity`` is the usual PTB perplexity definition (up to the model's tokenizer).
    """
    lines = [ln.strip() for ln in load_text("ptb", split, data_dir).splitlines() if ln.strip()]
    docs = []
    for i in range(0, len(lines), lines_per_doc):
        chunk = lines[i: i + lines_per_doc]
        docs.append({"text": "".join(ln + "\n" for ln in chunk), "first_line": i,
                     "n_words": sum(len(ln.split()) for ln in chunk) + len(chunk)})
    return docs


def ptb_process_results(doc: dict, results) -> dict:
    (loglikelihood,) = results
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, doc["n_words"]), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}


# ----------------------------------------------------------------------------------------------- MC

def mc_word_streams(corpus: str, split: str = "test", data_dir=None) -> list[list[str]]:
    """Word streams that spans may not cross: one per WikiText article (body lines in the release's own
    tokenized form, e.g. ``" @-@ "``, headings dropped), or the whole split for PTB (consecutive WSJ
    sentences, ``<unk>``/``N`` kept)."""
    if corpus == "wikitext2":
        streams = []
        for art in wikitext_documents_list(split, data_dir):
            words: list[str] = []
            for line in art["page"].splitlines():
                s = line.strip()
                if s and not _ANY_HEADING.match(s):
                    words += s.split()
            streams.append(words)
        return streams
    if corpus == "ptb":
        return [load_text("ptb", split, data_dir).split()]
    raise ValueError(f"no multiple-choice builder for corpus {corpus!r}; expected 'wikitext2' or 'ptb'")


def build_mc_docs(streams: list[list[str]], *, n_docs: int, context_words: int, continuation_words: int,
                  seed: int, mode: str = "continuation") -> list[dict]:
    """Seeded 4-way multiple-choice items from word streams.

    Items are ``n_docs`` windows drawn without replacement from the grid of non-overlapping
    ``context_words + continuation_words`` windows of every stream, in seeded random order (so any
    ``limit`` prefix is a random sample of the split). ``context`` is the window's first ``context_words``
    words and ``continuation`` the rest.

    ``mode="continuation"``: ``choices`` are 4 continuations, the true one and 3 distractors.
    ``mode="context"``: ``choices`` are 4 contexts, the true one and 3 distractors (lm-eval scores the fixed
    continuation after each: the continuation's own likelihood cancels out, as in Winogrande).

    Distractors are real spans of the same number of words, starting anywhere in the split (uniform over
    start positions), never overlapping the item's own window and textually distinct from the other choices;
    the true choice sits at a seeded uniform position ``label``.
    """
    if mode not in ("continuation", "context"):
        raise ValueError(f"mode must be 'continuation' or 'context', got {mode!r}")
    if min(n_docs, context_words, continuation_words) <= 0:
        raise ValueError("n_docs, context_words and continuation_words must be positive")
    win = context_words + continuation_words
    span = continuation_words if mode == "continuation" else context_words
    grid = [(s, st) for s, ws in enumerate(streams) for st in range(0, len(ws) - win + 1, win)]
    if len(grid) < n_docs:
        raise ValueError(f"only {len(grid)} windows of {win} words exist, fewer than n_docs={n_docs}")
    cum, total = [], 0  # flat index over every valid distractor start of every stream
    for ws in streams:
        total += max(0, len(ws) - span + 1)
        cum.append(total)

    rng = random.Random(seed)
    docs = []
    for s, st in rng.sample(grid, n_docs):
        words = streams[s]
        context = " ".join(words[st: st + context_words])
        continuation = " ".join(words[st + context_words: st + win])
        true = continuation if mode == "continuation" else context
        choices = [true]
        for _ in range(10_000):
            if len(choices) == 4:
                break
            k = rng.randrange(total)
            ds = bisect.bisect_right(cum, k)
            dst = k - (cum[ds - 1] if ds else 0)
            if ds == s and dst < st + win and dst + span > st:
                continue  # overlaps the item's own window
            cand = " ".join(streams[ds][dst: dst + span])
            if cand not in choices:
                choices.append(cand)
        else:  # pragma: no cover - needs a degenerate corpus
            raise RuntimeError("could not draw 3 distinct distractors")
        distractors = choices[1:]
        label = rng.randrange(4)
        docs.append({"context": context, "continuation": continuation,
                     "choices": distractors[:label] + [true] + distractors[label:], "label": label,
                     "stream": s, "offset": st})
    return docs


def mc_documents_list(corpus: str, split: str = "test", data_dir=None, *, n_docs: int = MC_DEFAULTS["n_docs"],
                      context_words: int = MC_DEFAULTS["context_words"],
                      continuation_words: int = MC_DEFAULTS["continuation_words"],
                      seed: int = MC_DEFAULTS["seed"], mode: str = "continuation") -> list[dict]:
    return build_mc_docs(mc_word_streams(corpus, split, data_dir), n_docs=n_docs, context_words=context_words,
                         continuation_words=continuation_words, seed=seed, mode=mode)


# ----------------------------------------------------------------------------------------------- lm-eval hooks
# lm-eval calls ``custom_dataset(**task metadata, **dataset_kwargs)``: the metadata carries ``data_dir`` when
# `evaluate_lm_eval(data_dir=...)` (or ``TaskManager(metadata={"data_dir": ...})``) sets it, plus keys such as
# ``version``/``config_source`` that are ignored here.

def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def wikitext2_dataset(split: str = "test", data_dir=None, **_):
    return _dataset_dict({split: wikitext_documents_list(split, data_dir)})


def ptb_dataset(split: str = "test", data_dir=None, lines_per_doc: int = PTB_LINES_PER_DOC, **_):
    return _dataset_dict({split: ptb_documents_list(split, data_dir, lines_per_doc)})


def mc_dataset(corpus: str, split: str = "test", fewshot_split: str = "validation", data_dir=None,
               n_docs: int = MC_DEFAULTS["n_docs"], context_words: int = MC_DEFAULTS["context_words"],
               continuation_words: int = MC_DEFAULTS["continuation_words"], seed: int = MC_DEFAULTS["seed"],
               mode: str = "continuation", **_):
    kw = dict(n_docs=n_docs, context_words=context_words, continuation_words=continuation_words, seed=seed,
              mode=mode)
    splits = {split: mc_documents_list(corpus, split, data_dir, **kw)}
    # few-shot examples come from another split of the same corpus (lm-eval builds the sampler even at 0 shots)
    splits[fewshot_split] = mc_documents_list(corpus, fewshot_split, data_dir, **kw)
    return _dataset_dict(splits)


def wikitext2_mc_dataset(**kwargs):
    return mc_dataset("wikitext2", **kwargs)


def ptb_mc_dataset(**kwargs):
    return mc_dataset("ptb", **kwargs)
