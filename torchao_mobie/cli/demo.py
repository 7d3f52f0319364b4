"""``torchao-mobie demo`` (every method on a zoo model, one table) and ``torchao-mobie zoo`` (list / train)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import make_config

__all__ = ["add_parsers", "cmd_demo", "cmd_zoo"]


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="quantize a zoo model with every method and print a comparison table")
    d.add_argument("--model", default=None, help="zoo model name (default: the fine-grained Qwen3-MoE model)")
    d.add_argument("--methods", nargs="*", default=None, help="subset of methods to compare")
    d.add_argument("--nsamples", type=int, default=32, help="calibration samples")
    d.add_argument("--seqlen", type=int, default=256)
    d.add_argument("--eval-windows", type=int, default=200, help="WikiText-2 test windows to evaluate on")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data-dir", default=None)
    d.add_argument("--json", default=None, help="also write the rows to this JSON file")
    d.add_argument("--plot", default=None, help="also write a PNG of the gap to full precision vs bits per method")
    d.set_defaults(fn=cmd_demo)
    z = sub.add_parser("zoo", help="list or train the reference zoo models")
    z.add_argument("action", choices=["list", "train"])
    z.add_argument("names", nargs="*", help="models to train (default: all)")
    z.set_defaults(fn=cmd_zoo)


def cmd_demo(args):
    from ..zoo import DEFAULT_MODEL

    methods = args.methods or ["mobie", "hbllm", "arb-x", "billm", "sign"]
    print(f"torchao-mobie demo: zoo model {args.model or DEFAULT_MODEL}, {args.nsamples}x{args.seqlen} WikiText-2 "
          f"calibration tokens, WikiText-2 test ({args.eval_windows} windows of {args.seqlen})", flush=True)
    from ..eval.report import compare_methods, format_table

    rows = compare_methods(args.model or DEFAULT_MODEL, {m: make_config(m) for m in methods},
                           nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                           data_dir=args.data_dir, seed=args.seed)
    print()
    print(format_table(rows, ["method", "paper_bits", "all_inclusive_bits", "wikitext2_ppl_fp", "wikitext2_ppl_q",
                              "wikitext2_gap", "wikitext2_topk_kept", "wikitext2_kl", "quant_seconds"]))
    print("\ngap = ln(PPL_q) - ln(PPL_fp); topk_kept = share of full-precision top-k expert assignments kept;\n"
          "bits: paper convention (sign planes + bitmaps) and all-inclusive (every stored bit).")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        from ..eval.plots import plot_gap_vs_bits

        print(f"wrote {plot_gap_vs_bits(rows, args.plot)}")


def cmd_zoo(args):
    from ..zoo import ZOO, available

    if args.action == "list":
        have = set(available())
        for name, spec in ZOO.items():
            print(f"{name:22s} {spec.model_type:10s} {spec.style:13s} {'committed' if name in have else 'missing'}")
    else:
        from ..zoo.train import main as train_main

        train_main(args.names + (["--all"] if not args.names else []))
