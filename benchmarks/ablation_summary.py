"""Does each MoBiE component help? Per model and component, the gap with it switched off minus the default's.

    python benchmarks/ablation_summary.py --name heldout_ablation_planes [--default mobie]

Reads benchmarks/results/<name>.json (rows of ``benchmarks/methods.py``: the default method and its
``mobie-no-*`` ablations, any number of seeds) and writes <name>_summary.md: for each model the mean WikiText-2
gap over seeds of the default and of each ablation, the difference (positive: switching the component off makes
the gap larger, i.e. the component helps), the paired seed spread, and per component the families where it helps
by more than the spread of the paired differences (``helps``), hurts by more (``hurts``) or neither (``~``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def family(model: str) -> str:
    for f in ("deepseekv3", "qwen3moe", "qwen2moe", "mixtral", "olmoe"):
        if f in model:
            return f
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--default", default="mobie")
    args = ap.parse_args(argv)
    data = json.loads((RESULTS / f"{args.name}.json").read_text())
    gaps: dict = defaultdict(dict)
    for r in data["rows"]:
        gaps[(r["model"], r["method"])][r["seed"]] = r["wikitext2_gap"]
    models = sorted({m for m, _ in gaps})
    comps = sorted({me[len("mobie-no-"):] for _, me in gaps if me.startswith("mobie-no-")})
    lines = [f"Source: `benchmarks/results/{args.name}.json` ({data.get('command', '')})", "",
             "delta = mean gap with the component off - mean gap of the default (same seeds); positive: it helps. "
             "Verdict: helps / hurts when |delta| exceeds the standard deviation of the paired per-seed "
             "differences, else ~.", "",
             "| model | default gap | " + " | ".join(f"no-{c}: delta (sd)" for c in comps) + " |",
             "|---|---|" + "---|" * len(comps)]
    verdicts: dict = defaultdict(lambda: defaultdict(list))
    for mo in models:
        base = gaps.get((mo, args.default), {})
        cells = []
        for c in comps:
            off = gaps.get((mo, f"mobie-no-{c}"), {})
            seeds = sorted(set(base) & set(off))
            if not seeds:
                cells.append("-")
                continue
            d = [off[s] - base[s] for s in seeds]
            mean = statistics.fmean(d)
            sd = statistics.stdev(d) if len(d) > 1 else float("nan")
            v = "helps" if mean > sd else "hurts" if -mean > sd else "~"
            verdicts[c][family(mo)].append(v)
            cells.append(f"{mean:+.4f} ({sd:.4f}) {v}")
        lines.append(f"| {mo} | {statistics.fmean(base.values()):.4f} | " + " | ".join(cells) + " |")
    lines += ["", "| component | families where it helps | hurts | neither |", "|---|---|---|---|"]
    for c in comps:
        fam = verdicts[c]
        pick = lambda v: ", ".join(f for f, vs in sorted(fam.items()) if v in vs) or "-"  # noqa: E731
        lines.append(f"| {c} | {pick('helps')} | {pick('hurts')} | {pick('~')} |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}_summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
