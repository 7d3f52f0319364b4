"""Does each MoBiE component help? Per model and component, the gap with it switched off minus the default's.

    python benchmarks/ablation_summary.py --name heldout_ablation_planes [--default mobie]

Reads benchmarks/results/<name>.json (rows of ``benchmarks/methods.py``: the default method and its
``mobie-no-*`` ablations, any number of seeds) and writes <name>_summary.md: for each model the mean WikiText-2
gap over seeds of the default and of each ablation, the difference (positive: switching the component off makes
the gap larger, i.e. the component helps), the paired seed spread, and per component the families where it helps
by more than the spread of the paired differences (``helps``), hurts by more (``hurts``) or neither (``~``);
the same for the share of full-precision top-k expert assignments kept (what NGES is for).
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


def table(rows, default: str, metric: str, sign: int, what: str) -> list[str]:
    """One metric's table: per model and component ``sign·(off − default)`` (positive: it helps), verdicts."""
    vals: dict = defaultdict(dict)
    for r in rows:
        vals[(r["model"], r["method"])][r["seed"]] = r[metric]
    models = sorted({m for m, _ in vals})
    comps = sorted({me[len("mobie-no-"):] for _, me in vals if me.startswith("mobie-no-")})
    lines = [f"**{what}**: delta = {'' if sign > 0 else '-('}mean with the component off - mean of the default"
             f"{'' if sign > 0 else ')'} (same seeds); positive: it helps. Verdict: helps / hurts when |delta| exceeds "
             "the standard deviation of the paired per-seed differences, else ~.", "",
             f"| model | default {what} | " + " | ".join(f"no-{c}: delta (sd)" for c in comps) + " |",
             "|---|---|" + "---|" * len(comps)]
    verdicts: dict = defaultdict(lambda: defaultdict(list))
    for mo in models:
        base = vals.get((mo, default), {})
        cells = []
        for c in comps:
            off = vals.get((mo, f"mobie-no-{c}"), {})
            seeds = sorted(set(base) & set(off))
            if not seeds:
                cells.append("-")
                continue
            d = [sign * (off[s] - base[s]) for s in seeds]
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
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--default", default="mobie")
    args = ap.parse_args(argv)
    data = json.loads((RESULTS / f"{args.name}.json").read_text())
    lines = [f"Source: `benchmarks/results/{args.name}.json` ({data.get('command', '')})", ""]
    for metric, sign, what in (("wikitext2_gap", 1, "WikiText-2 gap"), ("wikitext2_topk_kept", -1, "top-k kept")):
        lines += table(data["rows"], args.default, metric, sign, what)
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}_summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
