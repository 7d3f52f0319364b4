"""Per-expert binarization time at Qwen3-30B-A3B's width: the steady-state cost of a layer after the probe.

    python benchmarks/binarize_time.py [--experts 2] [--threads 1] [--name binarize_time]

A full real-size run (``benchmarks/scale.py``) takes hours per MoBiE layer on a 2-core machine; this isolates
the part that dominates it and scales with the expert count: fitting the binary factors of a few experts of
one layer (hidden 2048, expert width 768, random weights, Hessians of 2048 random tokens per expert). MoBiE
runs the plans its planner gives a 128-expert layer at the default 1.5-bit cap (per-expert factors, as
selected on every model measured; down_proj with NGES's left metric, here ``I + RᵀR/64``), with its default
rounds; BiLLM and ARB-LLM_X their per-expert defaults. Not included: statistics, GLAS, the probe layer's
layout selection (three more fits, once per model). Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    from torchao_mobie import BiLLMConfig, MoBiEConfig
    from torchao_mobie.algorithms import cejd as C
    from torchao_mobie.algorithms.planner import DOWN_SLACK, MARGIN
    from torchao_mobie.config import ARBLLMConfig
    from torchao_mobie.methods import mobie as M

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=2, help="experts fit per projection (default 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="binarize_time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    E_real, hid, inter, cap, E = 128, 2048, 768, 1.5, args.experts
    cfg = MoBiEConfig()
    per_expert = MoBiEConfig(cejd=False)  # the layout the selection keeps: per-expert factors
    gu = M.plans_for(per_expert, E_real, 2 * inter, hid, M.gate_up_bits(per_expert, E_real, hid, inter, cap) + MARGIN)[-1]
    dn = M.plans_for(per_expert, E_real, hid, inter, 3 * cap - 2 * gu.bits - DOWN_SLACK)[-1]
    g = torch.Generator().manual_seed(0)
    rows = []
    for proj, (m, n), plan in (("gate_up_proj", (2 * inter, hid), gu), ("down_proj", (hid, inter), dn)):
        W = torch.randn(E, m, n, generator=g) * 0.02
        X = torch.randn(E, 2048, n, generator=g)
        H = X.transpose(1, 2) @ X / 2048
        R = torch.randn(64, m, generator=g)
        G = torch.eye(m) + R.t() @ R / 64 if proj == "down_proj" else None
        runs = {
            "mobie": lambda: C.cejd_quantize(W, H, rounds=cfg.rounds, refine=cfg.refine, polish=cfg.polish,
                                             **M.fit_kwargs(cfg, plan, E_real, proj, G)),
            "billm": lambda: BiLLMConfig().quantize_experts(W, H),
            "arb-x": lambda: ARBLLMConfig(variant="x").quantize_experts(W, H),
        }
        for method, fn in runs.items():
            t = time.perf_counter()
            fn()
            s = time.perf_counter() - t
            rows.append({"projection": proj, "method": method, "seconds_per_expert": round(s / E, 2),
                         "plan": f"{plan.planes} plane(s) + {plan.salient} salient cols, {plan.bits:.2f} bits"
                         if method == "mobie" else ""})
            print(rows[-1], flush=True)
    total = {mt: round(sum(r["seconds_per_expert"] for r in rows if r["method"] == mt), 2) for mt in ("mobie", "billm", "arb-x")}
    out = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
           "threads": args.threads, "experts_fit": E, "rows": rows, "seconds_per_expert_layer": total,
           "mobie_vs_billm": round(total["mobie"] / total["billm"], 2)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    md = [f"Command: `{out['command']}`", "", "| projection | method | s per expert | MoBiE plan |", "|---|---|---|---|"]
    md += [f"| {r['projection']} | {r['method']} | {r['seconds_per_expert']} | {r['plan']} |" for r in rows]
    md += ["", "Per expert, both projections: " + ", ".join(f"{k} {v} s" for k, v in total.items())
           + f"; MoBiE / BiLLM {out['mobie_vs_billm']}"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
