"""lm-eval integration: offline local tasks, the multiple-choice stand-in, and evaluate_lm_eval on a tiny model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from torchao_mobie.data import DataNotFoundError, load_text, resolve_data_dir
from torchao_mobie.eval.lm_eval_tasks import utils as task_utils
from torchao_mobie.integrations.lm_eval import LOCAL_TASKS, TASK_DIR

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "torchao_mobie" / "zoo" / "models" / "_tokenizer"


def _need_local(corpus: str, split: str = "test"):
    d = resolve_data_dir()
    if d is None:
        pytest.skip("no local data directory (set MOBIE_DATA_DIR)")
    try:
        load_text(corpus, split, d)  # local files only: an explicit dir never falls back to the hub
    except DataNotFoundError:
        pytest.skip(f"{corpus}/{split} is not in {d}")
    return d


@pytest.fixture(scope="module")
def data_dir():
    for corpus in ("wikitext2", "ptb"):
        for split in ("test", "validation"):
            d = _need_local(corpus, split)
    return d


# ------------------------------------------------------------------ docs (no lm-eval needed)

def test_yaml_task_names_match_registry():
    names = set()
    for y in TASK_DIR.glob("*.yaml"):
        m = re.search(r"^task:\s*(\S+)\s*$", y.read_text(), re.M)
        assert m, y
        names.add(m.group(1))
    assert names == set(LOCAL_TASKS)
    assert (TASK_DIR / "README.md").is_file()


def test_perplexity_doc_counts(data_dir):
    wiki = task_utils.wikitext_documents_list("test", data_dir)
    assert len(wiki) == LOCAL_TASKS["wikitext2_local"][1] == 62
    assert wiki[0]["title"] == "Robert Boulter" and wiki[0]["page"].startswith(" = Robert Boulter = \n")
    assert all(not re.match(r"^ = = ", d["page"]) for d in wiki)
    ptb = task_utils.ptb_documents_list("test", data_dir)
    assert len(ptb) == LOCAL_TASKS["ptb_local"][1] == 76
    assert sum(d["n_words"] for d in ptb) == 82430  # 78,669 words + 3,761 <eos>: the classic PTB test count
    assert all(d["text"].endswith("\n") for d in ptb)


@pytest.mark.parametrize("corpus", ["wikitext2", "ptb"])
@pytest.mark.parametrize("mode", ["continuation", "context"])
def test_mc_docs_deterministic_and_well_formed(data_dir, corpus, mode):
    kw = dict(n_docs=1000, context_words=40, continuation_words=15, seed=1234, mode=mode)
    streams = task_utils.mc_word_streams(corpus, "test", data_dir)
    docs = task_utils.build_mc_docs(streams, **kw)
    assert len(docs) == 1000
    assert docs == task_utils.mc_documents_list(corpus, "test", data_dir, **kw)  # same seed -> same docs
    other = task_utils.build_mc_docs(streams, **{**kw, "seed": 7})
    assert [d["context"] for d in other] != [d["context"] for d in docs]
    labels = [d["label"] for d in docs]
    assert set(labels) == {0, 1, 2, 3} and max(labels.count(i) for i in range(4)) < 320  # roughly uniform
    span = 15 if mode == "continuation" else 40
    windows = set()
    for d in docs:
        words = streams[d["stream"]]
        st = d["offset"]
        assert d["context"] == " ".join(words[st: st + 40])
        assert d["continuation"] == " ".join(words[st + 40: st + 55])
        true = d["continuation"] if mode == "continuation" else d["context"]
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4  # exactly 4 distinct choices
        assert d["choices"][d["label"]] == true and d["choices"].count(true) == 1
        assert all(len(c.split()) == span for c in d["choices"])  # distractors: real spans, same length
        windows.add((d["stream"], st))
    assert len(windows) == 1000  # items never share a window
    if mode == "context":  # same items as the continuation task, asked the other way round
        cont = task_utils.build_mc_docs(streams, **{**kw, "mode": "continuation"})
        assert [(d["stream"], d["offset"]) for d in cont] == [(d["stream"], d["offset"]) for d in docs]


# ------------------------------------------------------------------ lm-eval task loading

def test_local_tasks_load_offline(data_dir):
    pytest.importorskip("lm_eval")
    from torchao_mobie.integrations.lm_eval import task_manager

    tm = task_manager(data_dir, include_defaults=False)
    loaded = tm.load(sorted(LOCAL_TASKS))["tasks"]
    for name, (_, n_docs) in LOCAL_TASKS.items():
        task = loaded[name]
        assert len(task.eval_docs) == n_docs, name
    mc = loaded["wikitext2_mc_local"]
    doc = mc.eval_docs[0]
    assert mc.doc_to_choice(doc)[mc.doc_to_target(doc)] == doc["continuation"]
    assert len(mc.fewshot_docs()) == 1000  # validation split, for num_fewshot > 0
    ctx = loaded["ptb_mc_ctx_local"]  # Winogrande-style: the gold index comes from doc_to_text
    doc = ctx.eval_docs[0]
    assert ctx.multiple_input == 4 and ctx.doc_to_choice(doc)[ctx.doc_to_text(doc)] == doc["context"]


def test_bad_data_dir_is_an_error(tmp_path):
    pytest.importorskip("lm_eval")
    from torchao_mobie.integrations.lm_eval import task_manager

    with pytest.raises(DataNotFoundError):
        task_manager(tmp_path / "missing", include_defaults=False)


# ------------------------------------------------------------------ evaluate_lm_eval on a tiny model

@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=4096, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _rolling_loglikelihood(model, ids: list[int], prefix: int, max_len: int) -> float:
    """Sum of log p(token) over a document, each prediction chunk of <= max_len tokens seeing the max_len
    tokens before its last target (the first chunk starts from `prefix`): lm-eval's rolling definition."""
    full = [prefix] + ids
    total, a = 0.0, 1
    while a < len(full):
        b = min(a + max_len, len(full))  # predict full[a:b]
        lo = max(0, b - 1 - max_len)
        inp = torch.tensor([full[lo: b - 1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].double(), -1)
        n = b - a
        tgt = torch.tensor(full[a:b])
        total += logp[-n:].gather(1, tgt[:, None]).sum().item()
        a = b
    return total


def test_evaluate_word_perplexity_matches_independent(tiny, data_dir):
    from torchao_mobie.integrations.lm_eval import evaluate_lm_eval

    model, tok = tiny
    max_len, n_docs = 128, 2
    res = evaluate_lm_eval(model, tok, ["wikitext2_local"], limit=n_docs, batch_size=8, max_length=max_len,
                           data_dir=data_dir)
    row = res["wikitext2_local"]
    assert row["n_samples"] == n_docs
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(row[k]) and row[k] > 0
    assert row["word_perplexity_stderr"] is None

    assert tok("a b", add_special_tokens=True)["input_ids"] == tok("a b", add_special_tokens=False)["input_ids"]
    ll, words, nbytes = 0.0, 0, 0
    for doc in task_utils.wikitext_documents_list("test", data_dir)[:n_docs]:
        text = task_utils.wikitext_detokenizer(doc)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 3 * max_len  # the rolling windows really roll
        ll += _rolling_loglikelihood(model, ids, tok.bos_token_id, max_len)
        words += len(re.split(r"\s+", doc["page"]))
        nbytes += len(doc["page"].encode("utf-8"))
    assert row["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-3)
    assert row["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-3)


def test_evaluate_mc_and_errors(tiny, data_dir):
    from torchao_mobie.integrations.lm_eval import evaluate_lm_eval

    model, tok = tiny
    names = ["wikitext2_mc_local", "ptb_mc_local", "wikitext2_mc_ctx_local"]
    res = evaluate_lm_eval(model, tok, names, limit=6, batch_size=8)
    for name in names:
        row = res[name]
        assert row["n_samples"] == 6
        keys = ("acc", "acc_stderr") + (() if "ctx" in name else ("acc_norm", "acc_norm_stderr"))
        for k in keys:
            assert math.isfinite(row[k]) and 0.0 <= row[k] <= 1.0, (name, k, row)
    with pytest.raises(ValueError, match="wikitext2_mc_local"):  # unknown names list the local tasks
        evaluate_lm_eval(model, tok, ["no_such_task_xyz"])
    with pytest.raises(ValueError):
        evaluate_lm_eval(model, tok, [])


def test_evaluate_with_a_tokenizer_without_bos_or_eos(tiny, data_dir):
    """lm-eval fell over with a bare TypeError; the model config's bos_token_id is used instead, and with
    none anywhere the error says what is missing."""
    import copy

    from torchao_mobie.integrations.lm_eval import evaluate_lm_eval

    model, tok = tiny
    bare = copy.deepcopy(tok)
    bare.bos_token = None
    bare.eos_token = None
    assert bare.bos_token_id is None and bare.eos_token_id is None
    ref = evaluate_lm_eval(model, tok, ["wikitext2_mc_local"], limit=4, batch_size=8)
    res = evaluate_lm_eval(model, bare, ["wikitext2_mc_local"], limit=4, batch_size=8)
    assert model.config.bos_token_id == tok.bos_token_id  # so the requests are the same as with the full one
    assert res["wikitext2_mc_local"]["acc"] == ref["wikitext2_mc_local"]["acc"]
    cfg = copy.deepcopy(model.config)
    try:
        model.config.bos_token_id = model.config.eos_token_id = None
        with pytest.raises(ValueError, match="no BOS or EOS token"):
            evaluate_lm_eval(model, bare, ["wikitext2_mc_local"], limit=4)
    finally:
        model.config = cfg
