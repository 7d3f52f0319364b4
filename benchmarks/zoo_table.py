"""Full-precision reference table of the zoo: perplexity, unigram floor, zero-shot accuracy.

    python benchmarks/zoo_table.py [--models NAME ...] [--mc-limit N]

Writes benchmarks/results/zoo.json and zoo.md. A zoo model counts as a real language model only if
its WikiText-2 test perplexity is below one fifth of its tokenizer's unigram perplexity on that text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from torchao_mobie.data import eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval import perplexity, unigram_perplexity
from torchao_mobie.zoo import ZOO, available, load_zoo_model, zoo_path

RESULTS = Path(__file__).resolve().parent / "results"
MC_TASKS = ("wikitext2_mc_local", "ptb_mc_local", "wikitext2_mc_ctx_local", "ptb_mc_ctx_local")


def evaluate_zoo_model(name: str, seqlen: int, data_dir=None, mc_limit: int | None = None) -> dict:
    model, tok = load_zoo_model(name)
    row = {"model": name, "family": ZOO[name].model_type, "style": ZOO[name].style,
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "checkpoint_MB": round((zoo_path(name) / "model.safetensors").stat().st_size / 1e6, 2),
           "seqlen": seqlen}
    for corpus in ("wikitext2", "ptb"):
        ids = tokenize_corpus(load_text(corpus, "test", data_dir), tok)
        t = time.time()
        row[f"{corpus}_ppl"] = round(perplexity(model, eval_windows(ids, seqlen)), 3)
        row[f"{corpus}_unigram_ppl"] = round(unigram_perplexity(ids), 3)
        row[f"{corpus}_tokens"] = ids.numel()
        row[f"{corpus}_eval_seconds"] = round(time.time() - t, 1)
    row["real_lm"] = row["wikitext2_ppl"] < row["wikitext2_unigram_ppl"] / 5
    if mc_limit != 0:
        from torchao_mobie.integrations.lm_eval import evaluate_lm_eval

        res = evaluate_lm_eval(model, tok, list(MC_TASKS), limit=mc_limit, data_dir=data_dir)
        for task, metrics in res.items():
            row[f"{task}_acc"] = round(metrics["acc"], 4)
            row[f"{task}_acc_stderr"] = round(metrics["acc_stderr"], 4)
    return row


def to_markdown(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if not c.endswith(("_tokens", "_seconds"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="default: every committed zoo model")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--mc-limit", type=int, default=None, help="docs per multiple-choice task (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="keep rows of other models already in zoo.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    names = args.models or available()
    cmd = ("python benchmarks/zoo_table.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows, commands = [], [cmd]
    if args.append and (args.out / "zoo.json").exists():
        old = json.loads((args.out / "zoo.json").read_text())
        rows = [r for r in old["rows"] if r["model"] not in names]
        commands = old["commands"] + [cmd]
    rows += [evaluate_zoo_model(n, args.seqlen, args.data_dir, args.mc_limit) for n in names]
    rows.sort(key=lambda r: list(ZOO).index(r["model"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=1))
    md = to_markdown(rows)
    (args.out / "zoo.md").write_text("Commands: " + " ; ".join(f"`{c}`" for c in commands) + "\n\n"
                                     "real_lm: WikiText-2 test perplexity below 1/5 of the tokenizer's unigram "
                                     "perplexity on the same text. Multiple choice: 4 choices (chance 0.25), "
                                     "accuracy +- standard error.\n\n" + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
