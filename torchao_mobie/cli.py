"""``torchao-mobie`` command line: demo, zoo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
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
    if method not in table:
        raise SystemExit(f"error: --method {method!r} is not known; expected one of {sorted(table)}")
    return table[method]()


def run_comparison(model_name: str, methods, *, nsamples: int, seqlen: int, eval_windows_n: int,
                   calib: str = "wikitext2", seed: int = 0, data_dir=None, progress: bool = True) -> list[dict]:
    """Quantize a zoo model with each method on the same calibration data; evaluate on the same windows."""
    import copy

    from .api import quantize_model
    from .data import calibration_samples, eval_windows, load_text, tokenize_corpus
    from .eval import compare_models
    from .zoo import load_zoo_model

    fp, tok = load_zoo_model(model_name)
    calib_ids = calibration_samples(tokenize_corpus(load_text(calib, "train", data_dir), tok), nsamples, seqlen, seed)
    test = eval_windows(tokenize_corpus(load_text("wikitext2", "test", data_dir), tok), seqlen,
                        max_windows=eval_windows_n)
    rows = []
    for method in methods:
        q = copy.deepcopy(fp)
        t = time.time()
        report = quantize_model(q, make_config(method), calib_ids, progress=progress)
        seconds = time.time() - t
        r = compare_models(fp, q, test)
        rows.append({"model": model_name, "method": method, "paper_bits": round(report.bits.paper_bits, 3),
                     "all_inclusive_bits": round(report.bits.all_inclusive_bits, 3),
                     "ppl_fp": round(r.ppl_fp, 3), "ppl_q": round(r.ppl_q, 3), "gap": round(r.gap, 4),
                     "topk_kept": round(r.expert_shift.mean_topk_kept, 4), "kl": round(r.kl, 4),
                     "quant_seconds": round(seconds, 1), "eval_tokens": r.n_tokens})
    return rows


def print_table(rows: list[dict], cols=None, file=sys.stdout):
    cols = cols or list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)), file=file)


def cmd_demo(args):
    from .zoo import DEFAULT_MODEL

    methods = args.methods or (["mobie"] if _has_mobie() else []) + ["arb-x", "billm", "sign"]
    print(f"torchao-mobie demo: zoo model {args.model or DEFAULT_MODEL}, {args.nsamples}x{args.seqlen} WikiText-2 "
          f"calibration tokens, WikiText-2 test ({args.eval_windows} windows of {args.seqlen})", flush=True)
    rows = run_comparison(args.model or DEFAULT_MODEL, methods, nsamples=args.nsamples, seqlen=args.seqlen,
                          eval_windows_n=args.eval_windows, data_dir=args.data_dir, seed=args.seed)
    print()
    print_table(rows, ["method", "paper_bits", "all_inclusive_bits", "ppl_fp", "ppl_q", "gap", "topk_kept", "kl",
                       "quant_seconds"])
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
