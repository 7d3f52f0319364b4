"""Quality of every binarization method on the zoo: gap to full precision, bits, expert shift, time.

    python benchmarks/methods.py --name baselines                       # issue 3 table
    python benchmarks/methods.py --name mobie --methods mobie billm arb-x arb-rc --seeds 0 1 2
    python -m torchao_mobie.zoo.train --heldout --all                   # held-out models (not committed)
    python benchmarks/methods.py --name heldout --models heldout-mixtral-9m heldout-qwen3moe-12m \
        --methods sign billm arb-rc arb-x hbllm --seeds 0 1 2 --corpora wikitext2  # vs the published code

Writes benchmarks/results/<name>.json (every row + the command), <name>.md (mean over seeds, spread in
brackets) and <name>.png (WikiText-2 gap vs all-inclusive bits per model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from torchao_mobie.cli import make_config
from torchao_mobie.eval.plots import plot_gap_vs_bits
from torchao_mobie.eval.report import compare_methods, group_by_method
from torchao_mobie.zoo import ZOO, available

RESULTS = Path(__file__).resolve().parent / "results"
# WikiText-2 gap of the published BiLLM / ARB-LLM code (and naive sign) on held-out models of the same
# kind, mean of three calibration seeds (design/paper_and_baselines.md §11); HBLLM and the DeepSeek-V3
# kind: one seed (issue 15, design/paper_and_baselines.md §12). Same-model comparisons with the published
# HBLLM code: benchmarks/peer_hbllm.py.
PEER_GAPS = {"heldout-mixtral-9m": {"billm": 0.044, "arb-rc": 0.032, "arb-x": 0.029, "sign": 0.38, "hbllm": 0.0083},
             "heldout-qwen3moe-12m": {"billm": 0.062, "arb-rc": 0.047, "arb-x": 0.027, "sign": 0.35, "hbllm": 0.0087},
             "heldout-deepseekv3-9m": {"billm": 0.035, "arb-x": 0.023, "hbllm": 0.0116}}
METRICS = ("paper_bits", "all_inclusive_bits", "wikitext2_gap", "ptb_gap", "wikitext2_topk_kept", "ptb_topk_kept",
           "wikitext2_kl", "ptb_kl", "quant_seconds")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (model, method), with min-max spread of the gaps."""
    out = []
    for (model, method), rs in group_by_method(rows).items():
        s = {"model": model, "method": method, "calib": rs[0].get("calib", "wikitext2"), "seeds": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if m in r]
            if vals:
                s[m] = round(statistics.fmean(vals), 4)
                if m.endswith("_gap") and len(vals) > 1:
                    s[m + "_spread"] = f"{min(vals):.4f}-{max(vals):.4f}"
        out.append(s)
    for s in out:  # ratios against the baselines of the same model
        base = {o["method"]: o for o in out if o["model"] == s["model"]}
        if "billm" in base and base["billm"].get("wikitext2_gap"):
            s["gap_vs_billm"] = round(s["wikitext2_gap"] / base["billm"]["wikitext2_gap"], 3)
        peer = PEER_GAPS.get(s["model"], {}).get(s["method"])
        if peer is not None:
            s["published_code_gap"] = peer
            s["gap_vs_published"] = round(s["wikitext2_gap"] / peer, 3)
    for s in out:  # the naive sign gap has no algorithmic freedom: its ratio measures the model's fragility
        sign = next((o for o in out if o["model"] == s["model"] and o["method"] == "sign"), None)
        if "gap_vs_published" in s and sign is not None and "gap_vs_published" in sign:
            s["vs_published_per_fragility"] = round(s["gap_vs_published"] / sign["gap_vs_published"], 3)
    return out


def markdown(summary: list[dict], command: str) -> str:
    cols = ["model", "method", "calib", "seeds", "paper_bits", "all_inclusive_bits", "wikitext2_gap", "wikitext2_gap_spread",
            "ptb_gap", "ptb_gap_spread", "gap_vs_billm", "published_code_gap", "gap_vs_published", "vs_published_per_fragility",
            "wikitext2_topk_kept",
            "ptb_topk_kept", "wikitext2_kl", "ptb_kl", "quant_seconds"]
    cols = [c for c in cols if any(c in s for s in summary)]
    lines = [f"Command: `{command}`", "", "gap = ln(PPL_q) - ln(PPL_fp) on the test split; bits per expert weight in "
             "the papers' convention (sign planes + bitmaps) and all-inclusive (every stored bit).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s.get(c, "")) for c in cols) + " |" for s in summary]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baselines", help="results file stem")
    ap.add_argument("--models", nargs="*", default=None, help="zoo models (default: all committed, micro excluded)")
    ap.add_argument("--methods", nargs="*", default=["sign", "billm", "arb", "arb-x", "arb-rc"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calib", default="wikitext2", help="calibration corpus or a mix, e.g. wikitext2+ptb")
    ap.add_argument("--eval-windows", type=int, default=300, help="test windows per corpus (0: whole split)")
    ap.add_argument("--corpora", nargs="*", default=["wikitext2", "ptb"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite <name>.md/.png from the rows already in <name>.json (no quantization)")
    ap.add_argument("--compare-with", default=None, metavar="NAME:METHOD",
                    help="with --report-only: also tabulate METHOD's seed-0 rows from NAME.json (e.g. baselines:mobie)")
    ap.add_argument("--merge", nargs="*", default=None, metavar="NAME",
                    help="with --report-only: add the rows (and commands) of NAME.json files from parallel runs")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of <name>.json for other models/methods/seeds (run models one at a time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out_json = RESULTS / f"{args.name}.json"
    if args.report_only:
        old = json.loads(out_json.read_text())
        rows = old["rows"]
        if args.merge:  # results of parallel runs (other --name's) joined into this one; the same key is an error
            commands = old.get("commands", [old["command"]])
            for name in args.merge:
                other = json.loads((RESULTS / f"{name}.json").read_text())
                keys = {(r["model"], r["method"], r["seed"], r.get("calib")) for r in rows}
                clash = [r for r in other["rows"] if (r["model"], r["method"], r["seed"], r.get("calib")) in keys]
                if clash:
                    ap.error(f"--merge {name}: rows already in {args.name}.json, e.g. {clash[0]['model']} "
                             f"{clash[0]['method']} seed {clash[0]['seed']}")
                rows += other["rows"]
                commands += other.get("commands", [other["command"]])
            commands.append("python benchmarks/methods.py " + " ".join(sys.argv[1:] if argv is None else argv))
            old = {"command": commands[0], "commands": commands, "rows": rows}
            out_json.write_text(json.dumps(old | {"summary": summarize(rows)}, indent=1))
        if args.compare_with:
            name, method = args.compare_with.split(":")
            models = {r["model"] for r in rows}
            rows = rows + [r for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"]
                           if r["method"] == method and r["seed"] == 0 and r["model"] in models]
        summary = summarize(rows)
        md = markdown(summary, " ; ".join(old.get("commands", [old["command"]])))
        (RESULTS / f"{args.name}.md").write_text(md)
        plot_gap_vs_bits(summary, RESULTS / f"{args.name}.png")
        print(md)
        return
    models = args.models or [m for m in available() if ZOO[m].style != "micro"]
    command = "python benchmarks/methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows, commands = [], [command]
    if args.append and out_json.exists():
        old = json.loads(out_json.read_text())
        redo = {(m, meth, sd) for m in models for meth in args.methods for sd in args.seeds}
        rows = [r for r in old["rows"] if (r["model"], r["method"], r["seed"]) not in redo]
        commands = old.get("commands", [old["command"]]) + [command]
    for model in models:
        for seed in args.seeds:
            rows += compare_methods(model, {m: make_config(m) for m in args.methods}, nsamples=args.nsamples,
                                    seqlen=args.seqlen, eval_windows=args.eval_windows or None, corpora=args.corpora,
                                    calib=args.calib, seed=seed, data_dir=args.data_dir, progress=False)
            summary = summarize(rows)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps({"command": command, "commands": commands, "rows": rows,
                                            "summary": summary}, indent=1))
            print(f"[{model} seed {seed}] done", flush=True)
    md = markdown(summary, " ; ".join(commands))
    (RESULTS / f"{args.name}.md").write_text(md)
    plot_gap_vs_bits(summary, RESULTS / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()
