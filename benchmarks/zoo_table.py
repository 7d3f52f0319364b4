"""Full-precision reference table of the zoo: perplexity, unigram floor, zero-shot accuracy.

    python benchmarks/zoo_table.py [--models NAME ...] [--mc-limit N]

Writes benchmarks/results/zoo.json and zoo.md. A zoo model counts as a real language model only if
its WikiText-2 test perplexity is below one fifth of its tokenizer's unigram perplexity on that text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from torchao_mobie.data import eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval import perplexity, unigram_perplexity
from torchao_mobie.zoo import ZOO, available, load_zoo_model, zoo_path

RESULTS = Path(__file__).resolve().parent / "results"


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

        res = evaluate_lm_eval(model, tok, ["wikitext2_mc_local", "ptb_mc_local"], limit=mc_limit,
                               data_dir=data_dir)
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
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = [evaluate_zoo_model(n, args.seqlen, args.data_dir, args.mc_limit) for n in (args.models or available())]
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/zoo_table.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (args.out / "zoo.json").write_text(json.dumps({"command": cmd.strip(), "rows": rows}, indent=1))
    md = to_markdown(rows)
    (args.out / "zoo.md").write_text(f"Command: `{cmd.strip()}`\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
