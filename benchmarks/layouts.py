"""Which layout MoBiE's held-back selection chooses for each judged projection, and the judged losses.

    python benchmarks/layouts.py --models heldout-olmoe-64e heldout-mixtral-9m --seeds 0 1 2 --name heldout_layouts

The default config on 32x256 WikiText-2 train calibration tokens (the seeds of ``benchmarks/methods.py``), one
thread. Every ``select_plan`` call is recorded: the candidate layouts (``input`` / ``output``: a joint CEJD
backbone on that side; ``none``: per-expert factors), the mean held-back LM loss of each and the one chosen.
Projections with a single candidate (past the probe layers, once the joint layouts lost) are not listed: they
get that candidate. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import torchao_mobie.methods.mobie as mobie_method
from torchao_mobie.api import quantize_model
from torchao_mobie.cli import make_config
from torchao_mobie.data import calibration_samples, load_text, tokenize_corpus
from torchao_mobie.zoo import load_zoo_model

RESULTS = Path(__file__).resolve().parent / "results"


def judged_layouts(model, ids, method: str = "mobie") -> list[dict]:
    """Quantize a copy of ``model`` and return every layout selection it made."""
    log = []
    select = mobie_method.select_plan

    def recording(plans, fit, score, name="", **kw):
        plan, res, means = select(plans, fit, score, name, **kw)
        log.append({"projection": name, "candidates": [p.side for p in plans],
                    "heldback_loss": [round(m, 5) for m in means], "chosen": plan.side})
        return plan, res, means

    mobie_method.select_plan = recording
    try:
        torch.manual_seed(0)
        quantize_model(copy.deepcopy(model), make_config(method), ids, progress=False)
    finally:
        mobie_method.select_plan = select
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--method", default="mobie")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="layouts")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        model, tok = load_zoo_model(name)
        stream = tokenize_corpus(load_text("wikitext2", "train", args.data_dir), tok)
        for seed in args.seeds:
            for r in judged_layouts(model, calibration_samples(stream, 32, 256, seed), args.method):
                rows.append({"model": name, "seed": seed, **r})
                print(rows[-1], flush=True)
    command = "python benchmarks/layouts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [f"Command: `{command}`", "", "| model | seed | projection | candidates: held-back loss | chosen |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seed']} | {r['projection']} | "
              + ", ".join(f"{c} {m}" for c, m in zip(r["candidates"], r["heldback_loss"]))
              + f" | {r['chosen']} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
