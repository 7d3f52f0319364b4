"""Quantization wall time of each method on the zoo, measured back to back in one process.

    python benchmarks/quant_time.py                        # every committed zoo model, mobie vs billm vs arb-x
    python benchmarks/quant_time.py --models qwen3moe-32e --methods mobie billm --repeats 3
    python benchmarks/quant_time.py --name quant_time_hbllm --methods billm hbllm   # HBLLM vs BiLLM

The tables of ``methods.py`` carry a ``quant_seconds`` column too, but those runs share the machine with
evaluation and other jobs; here every method sees the same calibration tokens, one thread, and the
methods alternate (``--repeats`` rounds, the median is reported), so the ratios are comparable.
Writes benchmarks/results/<name>.{json,md} (default quant_time).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from torchao_mobie.api import quantize_model
from torchao_mobie.cli import make_config
from torchao_mobie.data import calibration_samples, load_text, tokenize_corpus
from torchao_mobie.zoo import ZOO, available, load_zoo_model

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=["mobie", "billm", "arb-x"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="quant_time", help="results file stem")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models or [m for m in available() if ZOO[m].style != "micro"]
    rows = []
    for model in models:
        fp, tok = load_zoo_model(model)
        ids = calibration_samples(tokenize_corpus(load_text("wikitext2", "train", args.data_dir), tok),
                                  args.nsamples, args.seqlen, 0)
        times = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for method in args.methods:
                q = copy.deepcopy(fp)
                torch.manual_seed(0)
                t = time.perf_counter()
                quantize_model(q, make_config(method), ids, progress=False)
                times[method].append(time.perf_counter() - t)
                del q
        ref = statistics.median(times["billm"]) if "billm" in times else None
        for method, ts in times.items():
            med = statistics.median(ts)
            rows.append({"model": model, "method": method, "median_seconds": round(med, 2),
                         "runs": [round(x, 2) for x in ts],
                         "vs_billm": None if ref is None else round(med / ref, 2)})
            print(rows[-1], flush=True)
    command = "python benchmarks/quant_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "threads": 1, "rows": rows}, indent=1))
    lines = [f"Command: `{command}` (one thread, methods alternating, median of {args.repeats})", "",
             "| model | method | median s | runs | vs BiLLM |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['median_seconds']} | {r['runs']} | {r['vs_billm']} |" for r in rows]
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
