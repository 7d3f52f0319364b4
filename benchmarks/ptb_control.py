"""Is the PTB gap a measure of quantization quality on the zoo? A control with random perturbations.

    python benchmarks/ptb_control.py                        # qwen3moe-32e and qwen2moe-32e-shared
    python benchmarks/ptb_control.py --models olmoe-32e --sigmas 0.35 0.5 --seeds 0 1 2
    python benchmarks/ptb_control.py --reuse-noise          # only re-read the methods' rows (after methods.py)

The zoo models are trained on WikiText-2 only, so PTB is out of domain (full-precision PTB perplexity
about 2x WikiText-2's). In domain, the log-perplexity gap of a perturbed model is close to the KL
divergence from the full-precision model (the data distribution is close to the model's). Out of domain
it is not: ``gap = KL + E_data[...]`` has a term that depends on the *direction* of the perturbation
relative to the mismatch between PTB and the model. This script adds Gaussian noise of relative size
``sigma`` to every expert weight (several noise seeds per size), measures gap and KL on both corpora,
and puts the methods' rows of benchmarks/results/baselines.json beside them (their PTB KL is measured
there). Writes benchmarks/results/ptb_control.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from torchao_mobie.data import eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval.metrics import compare_models
from torchao_mobie.eval.report import group_by_method
from torchao_mobie.zoo import load_zoo_model

RESULTS = Path(__file__).resolve().parent / "results"
CORPORA = ("wikitext2", "ptb")


def perturb_experts(model, sigma: float, seed: int) -> None:
    """``W += sigma·rms(W)·N(0, 1)`` on every fused expert weight (3D gate_up_proj / down_proj)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj"):
                p.add_(sigma * p.float().pow(2).mean().sqrt() * torch.randn(p.shape, generator=g).to(p.dtype))


def noise_rows(model_name: str, sigmas, seeds, windows: int, data_dir=None) -> list[dict]:
    fp, tok = load_zoo_model(model_name)
    tests = {c: eval_windows(tokenize_corpus(load_text(c, "test", data_dir), tok), 256, max_windows=windows)
             for c in CORPORA}
    rows = []
    for sigma in sigmas:
        for seed in seeds:
            q = copy.deepcopy(fp)
            perturb_experts(q, sigma, seed)
            row = {"model": model_name, "method": f"noise-{sigma}", "sigma": sigma, "seed": seed}
            for c, w in tests.items():
                r = compare_models(fp, q, w)
                row.update({f"{c}_gap": round(r.gap, 5), f"{c}_kl": round(r.kl, 5)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def method_rows(models, path: Path) -> list[dict]:
    if not path.exists():
        return []
    keep = ("mobie", "billm", "arb", "arb-x", "arb-rc", "hbllm")
    return [{k: r[k] for k in ("model", "method", "seed", "wikitext2_gap", "wikitext2_kl", "ptb_gap", "ptb_kl")}
            for r in json.loads(path.read_text())["rows"]
            if r["model"] in models and r["method"] in keep and r.get("calib", "wikitext2") == "wikitext2"]


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for (model, method), rs in group_by_method(rows).items():
        s = {"model": model, "method": method, "n": len(rs)}
        for k in ("wikitext2_gap", "wikitext2_kl", "ptb_gap", "ptb_kl"):
            vals = [r[k] for r in rs]
            s[k] = round(statistics.fmean(vals), 4)
            if k == "ptb_gap" and len(vals) > 1:
                s["ptb_gap_range"] = f"{min(vals):.4f} to {max(vals):.4f}"
        s["ptb_gap_over_kl"] = round(s["ptb_gap"] / s["ptb_kl"], 2) if s["ptb_kl"] else None
        s["wikitext2_gap_over_kl"] = round(s["wikitext2_gap"] / s["wikitext2_kl"], 2) if s["wikitext2_kl"] else None
        out.append(s)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 4 * len(models)), squeeze=False)
    colors = {"mobie": "C3", "billm": "C0", "arb": "C1", "arb-x": "C2", "arb-rc": "C4", "hbllm": "C5"}
    for i, model in enumerate(models):
        for j, c in enumerate(CORPORA):
            ax = axes[i][j]
            rs = [r for r in rows if r["model"] == model]
            top = max(max(r[f"{c}_kl"] for r in rs), max(r[f"{c}_gap"] for r in rs)) * 1.1
            ax.plot([0, top], [0, top], "k:", lw=1, label="gap = KL")
            noise = [r for r in rs if r["method"].startswith("noise")]
            ax.scatter([r[f"{c}_kl"] for r in noise], [r[f"{c}_gap"] for r in noise], c="0.6", marker="x",
                       label="Gaussian noise (seeds)")
            for m, col in colors.items():
                pts = [r for r in rs if r["method"] == m]
                if pts:
                    ax.scatter([r[f"{c}_kl"] for r in pts], [r[f"{c}_gap"] for r in pts], c=col, label=m)
            ax.axhline(0, c="k", lw=0.5)
            ax.set_xlabel(f"KL(fp || q) on {c} test, nats/token")
            ax.set_ylabel(f"{c} gap = ln PPL_q - ln PPL_fp")
            ax.set_title(f"{model}: {c}" + (" (out of domain)" if c == "ptb" else " (training domain)"))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["qwen3moe-32e", "qwen2moe-32e-shared"])
    ap.add_argument("--sigmas", nargs="*", type=float, default=[0.35, 0.5])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--windows", type=int, default=300)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--reuse-noise", action="store_true",
                    help="take the noise rows (and their command) from the existing ptb_control.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/ptb_control.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.reuse_noise:
        old = json.loads((RESULTS / "ptb_control.json").read_text())
        rows = [r for r in old["rows"] if r["method"].startswith("noise")]
        args.models = sorted({r["model"] for r in rows})
        command = f"{old['command']} ; {command}"
    else:
        rows = []
        for model in args.models:
            rows += noise_rows(model, args.sigmas, args.seeds, args.windows, args.data_dir)
    rows += method_rows(set(args.models), RESULTS / "baselines.json")
    summary = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ptb_control.json").write_text(json.dumps({"command": command, "rows": rows, "summary": summary},
                                                         indent=1))
    cols = ["model", "method", "n", "wikitext2_gap", "wikitext2_kl", "wikitext2_gap_over_kl", "ptb_gap",
            "ptb_gap_range", "ptb_kl", "ptb_gap_over_kl"]
    lines = [f"Command: `{command}` (method rows: benchmarks/results/baselines.json, WikiText-2 calibration)", "",
             "Means over seeds (noise seeds for `noise-<sigma>`, calibration seeds for methods); KL = mean "
             "KL(p_fp || p_q) per predicted token.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s.get(c, "")) for c in cols) + " |" for s in summary]
    md = "\n".join(lines) + "\n"
    (RESULTS / "ptb_control.md").write_text(md)
    plot(rows, RESULTS / "ptb_control.png")
    print(md)


if __name__ == "__main__":
    main()
