import pytest
import torch

from torchao_mobie.data import (
    DataNotFoundError,
    calibration_samples,
    calibration_set,
    eval_windows,
    load_text,
    resolve_data_dir,
    tokenize_corpus,
)


def test_resolver_finds_shared_data():
    d = resolve_data_dir()
    assert d is not None and (d / "ptb" / "ptb.test.txt").is_file()


def test_load_text_splits():
    test = load_text("wikitext2", "test")
    assert test.splitlines()[1] == " = Robert Boulter = "
    assert len(test.encode()) == 1290590  # the raw release, not the tokenized one
    assert load_text("ptb", "validation").startswith(" consumers may want")
    train = load_text("wikitext2", "train")  # falls back to the tokenized release offline
    assert "<unk>" in train and len(train.encode()) == 10797148


def test_explicit_data_dir_and_env(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c\n")
    assert load_text("ptb", "test", data_dir=tmp_path) == " a b c\n"
    monkeypatch.setenv("MOBIE_DATA_DIR", str(tmp_path))
    assert load_text("ptb", "test") == " a b c\n"


def test_missing_corpus_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed / offline
    with pytest.raises(DataNotFoundError) as e:
        load_text("ptb", "test", data_dir=tmp_path)
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(e.value) and "datasets" in str(e.value)
    with pytest.raises(DataNotFoundError, match="not a readable directory"):
        load_text("ptb", "test", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="corpus='wt103'"):
        load_text("wt103")
    with pytest.raises(ValueError, match="split='dev'"):
        load_text("ptb", "dev")


def test_calibration_samples_seeded_windows():
    ids = torch.arange(1000)
    a = calibration_samples(ids, 8, 32, seed=3)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_samples(ids, 8, 32, seed=3))
    assert not torch.equal(a, calibration_samples(ids, 8, 32, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.long))  # contiguous windows
    for bad in (dict(n_samples=0), dict(n_samples=-1), dict(seqlen=0)):
        kw = dict(n_samples=2, seqlen=4) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            calibration_samples(ids, **kw)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        calibration_samples(torch.arange(10), 2, 10)


def test_calibration_mix_shares_windows_evenly_and_one_stream_is_unchanged():
    a, b = torch.arange(1000), torch.arange(5000, 6000)
    assert torch.equal(calibration_samples([a], 5, 16, seed=1), calibration_samples(a, 5, 16, seed=1))
    mix = calibration_samples([a, b], 5, 16, seed=1)
    assert mix.shape == (5, 16)
    assert (mix[:3] < 1000).all() and (mix[3:] >= 5000).all()  # 3 + 2: the first stream takes the remainder
    assert torch.equal(mix, calibration_samples((a, b), 5, 16, seed=1))
    with pytest.raises(ValueError, match="token stream 1 of the mix has 10 tokens"):
        calibration_samples([a, torch.arange(10)], 4, 16)
    with pytest.raises(ValueError, match="fewer than the 2 calibration streams"):
        calibration_samples([a, b], 1, 16)
    with pytest.raises(ValueError, match="non-empty list"):
        calibration_samples([], 4, 16)


def test_calibration_set_names_a_corpus_or_a_mix():
    from torchao_mobie.zoo import load_zoo_model

    _, tok = load_zoo_model("micro-qwen3moe")
    w = tokenize_corpus(load_text("wikitext2", "train"), tok)
    p = tokenize_corpus(load_text("ptb", "train"), tok)
    assert torch.equal(calibration_set("wikitext2", tok, 4, 32, seed=2), calibration_samples(w, 4, 32, seed=2))
    assert torch.equal(calibration_set("wikitext2+ptb", tok, 4, 32, seed=2),
                       calibration_samples([w, p], 4, 32, seed=2))
    for bad in ("wt103", "wikitext2+", "wikitext2+ptb+nope"):
        with pytest.raises(ValueError, match="expected a corpus name or names joined by"):
            calibration_set(bad, tok, 4, 32)


def test_eval_windows_non_overlapping():
    w = eval_windows(torch.arange(103), 10)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), torch.arange(100))
    assert eval_windows(torch.arange(103), 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        eval_windows(torch.arange(5), 10)


def test_tokenize_corpus_roundtrip(micro):
    _, tok = micro
    text = " = Robert Boulter = \n Robert Boulter is an English film actor ."
    ids = tokenize_corpus(text, tok)
    assert ids.dtype == torch.long and tok.decode(ids.tolist()) == text


def test_tokenize_corpus_cache_follows_the_tokenization_pipeline():
    """The in-memory cache returns copies, and a tokenizer that tokenizes differently never hits it."""
    from transformers import AutoTokenizer

    from torchao_mobie.data import tokenize_corpus
    from torchao_mobie.zoo import zoo_path

    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 20
    tok = AutoTokenizer.from_pretrained(zoo_path("micro-qwen3moe"))
    a = tokenize_corpus(text, tok)
    a[0] = -1  # a caller mutating its result must not poison the cache
    b = tokenize_corpus(text, AutoTokenizer.from_pretrained(zoo_path("micro-qwen3moe")))
    assert b[0] != -1 and torch.equal(b, tokenize_corpus(text, tok))
    other = AutoTokenizer.from_pretrained(zoo_path("micro-qwen3moe"))
    other.add_tokens(["tower"])
    c = tokenize_corpus(text, other)
    assert not torch.equal(c, b) and int(c.max()) >= len(tok)  # the added token is used, not the cached ids
