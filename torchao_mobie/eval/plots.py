"""PNG figures for the command line (matplotlib, the ``eval`` extra).

Figures are drawn on ``matplotlib.figure.Figure`` objects, not through pyplot, so no global backend is
switched and nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_expert_agreement", "plot_gap_vs_bits", "plot_memory"]


def _figure(size):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"plots need matplotlib ({e}); install it with `pip install 'torchao_mobie[eval]'`") from e
    return Figure(figsize=size, layout="constrained")


def plot_expert_agreement(topk_kept: list[float], top1_changed: list[float], path, title: str = "") -> Path:
    """Per MoE layer: share of full-precision top-k assignments kept and of top-1 experts kept."""
    fig = _figure((max(5.0, 0.5 * len(topk_kept) + 2), 3.5))
    ax = fig.add_subplot()
    x = list(range(len(topk_kept)))
    w = 0.4
    ax.bar([i - w / 2 for i in x], topk_kept, w, label="top-k assignments kept")
    ax.bar([i + w / 2 for i in x], [1 - v for v in top1_changed], w, label="top-1 expert kept")
    ax.set_xticks(x)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("agreement with full precision")
    ax.set_ylim(0, 1.05)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title(title or "expert routing agreement")
    fig.legend(loc="outside lower center", ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_memory(report, path, title: str = "", stored_label: str = "as stored") -> Path:
    """Stacked bars: the model in bf16 vs as stored, split into the :meth:`MemoryReport.components`."""
    fig = _figure((7.5, 4.0))
    ax = fig.add_subplot()
    mb = 1e-6
    bars = {"bf16": {"experts (bf16)": report.experts_bf16_bytes, "rest of model": report.rest_bf16_bytes},
            stored_label: report.components()}
    colors = {"experts signs + bitmaps": "tab:blue", "experts scales": "tab:orange", "experts backbone": "tab:green",
              "experts (not packed)": "tab:purple", "experts (bf16)": "tab:red", "rest of model": "tab:gray"}
    labelled = set()
    for i, (name, parts) in enumerate(bars.items()):
        bottom = 0.0
        for comp, nbytes in parts.items():
            if nbytes <= 0:
                continue
            ax.bar(i, nbytes * mb, 0.6, bottom=bottom, color=colors[comp], label=None if comp in labelled else comp)
            labelled.add(comp)
            bottom += nbytes * mb
        ax.text(i, bottom, f"{bottom:.3g} MB", ha="center", va="bottom")
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set_ylabel("MB")
    ax.set_ylim(0, max(report.model_bf16_bytes, report.model_bytes) * mb * 1.15)
    ax.set_title(title or "memory per component")
    fig.legend(loc="outside right upper", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _without_max_bits(method: str) -> str:
    """``mobie:max_bits=2.0,x=1`` -> ``mobie:x=1``; other labels unchanged."""
    name, _, opts = method.partition(":")
    kept = [o for o in opts.split(",") if o and not o.startswith("max_bits=")]
    if not opts or len(kept) == len(opts.split(",")):
        return method
    return name + (":" + ",".join(kept) if kept else "")


def plot_gap_vs_bits(rows: list[dict], path, corpus: str = "wikitext2") -> Path:
    """One panel per model: each method's gap ln(PPL_q/PPL_fp) against its all-inclusive bits per weight
    (the trade-off the method tables are about; log scale since the sign floor is ~10x the others)."""
    models = sorted({r["model"] for r in rows})
    fig = _figure((4.5 * len(models), 3.8))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        curves: dict[str, list] = {}
        for r in (r for r in rows if r["model"] == model and r.get(f"{corpus}_gap") is not None):
            x, y = r["all_inclusive_bits"], max(r[f"{corpus}_gap"], 1e-4)
            base = _without_max_bits(r["method"])
            if base != r["method"]:  # a budget sweep: one curve per method
                curves.setdefault(base, []).append((x, y))
                continue
            ax.scatter(x, y, s=40)
            ax.annotate(r["method"], (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        for base, pts in curves.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "-o", ms=4, label=f"{base} (max_bits sweep)")
        if curves:
            ax.legend(fontsize=7)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("all-inclusive bits / expert weight")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{corpus} gap ln(PPL_q/PPL_fp)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
