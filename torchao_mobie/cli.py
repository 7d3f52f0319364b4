"""``torchao-mobie`` command line: demo, zoo."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

METHODS = ("sign", "billm", "arb-rc", "arb-x")


def make_config(method: str, **kw):
    """The config object for a method name used on the command line."""
    from . import config as C

    table = {
        "sign": lambda: C.SignBinaryConfig(**kw),
        "billm": lambda: C.BiLLMConfig(**kw),
        "arb": lambda: C.ARBLLMConfig(variant="arb", **kw),
        "arb-x": lambda: C.ARBLLMConfig(variant="x", **kw),
        "arb-rc": lambda: C.ARBLLMConfig(variant="rc", **kw),
    }
    if hasattr(C, "MoBiEConfig"):
        table["mobie"] = lambda: C.MoBiEConfig(**kw)
        for part in ("cejd", "glas", "nges"):  # ablations: MoBiE with one component off
            table[f"mobie-no-{part}"] = lambda part=part: C.MoBiEConfig(**{part: False}, **kw)
    if method not in table:
        raise SystemExit(f"error: --method {method!r} is not known; expected one of {sorted(table)}")
    return table[method]()


def cmd_demo(args):
    from .zoo import DEFAULT_MODEL

    methods = args.methods or (["mobie"] if _has_mobie() else []) + ["arb-x", "billm", "sign"]
    print(f"torchao-mobie demo: zoo model {args.model or DEFAULT_MODEL}, {args.nsamples}x{args.seqlen} WikiText-2 "
          f"calibration tokens, WikiText-2 test ({args.eval_windows} windows of {args.seqlen})", flush=True)
    from .eval.report import compare_methods, format_table

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


def _has_mobie() -> bool:
    from . import config

    return hasattr(config, "MoBiEConfig")


def cmd_zoo(args):
    from .zoo import ZOO, available

    if args.action == "list":
        have = set(available())
        for name, spec in ZOO.items():
            print(f"{name:22s} {spec.model_type:10s} {spec.style:13s} {'committed' if name in have else 'missing'}")
    else:
        from .zoo.train import main as train_main

        train_main(args.names + (["--all"] if not args.names else []))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchao-mobie", description="1-bit quantization of MoE LLM experts (MoBiE).")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a zoo model with every method and print a comparison table")
    d.add_argument("--model", default=None, help="zoo model name (default: the fine-grained Qwen3-MoE model)")
    d.add_argument("--methods", nargs="*", default=None, help="subset of methods to compare")
    d.add_argument("--nsamples", type=int, default=32, help="calibration samples")
    d.add_argument("--seqlen", type=int, default=256)
    d.add_argument("--eval-windows", type=int, default=200, help="WikiText-2 test windows to evaluate on")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data-dir", default=None)
    d.add_argument("--json", default=None, help="also write the rows to this JSON file")
    d.set_defaults(fn=cmd_demo)
    z = sub.add_parser("zoo", help="list or train the reference zoo models")
    z.add_argument("action", choices=["list", "train"])
    z.add_argument("names", nargs="*", help="models to train (default: all)")
    z.set_defaults(fn=cmd_zoo)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    args.fn(args)


if __name__ == "__main__":
    main()
