"""Method comparisons on zoo models: the rows behind every quality table (demo, benchmarks).

Every method sees the same calibration tokens and is evaluated on the same windows against the same
full-precision model, so differences in the rows are differences between methods.
"""

from __future__ import annotations

import copy
import time

__all__ = ["compare_methods", "format_table"]


def compare_methods(model_name: str, configs: dict, *, nsamples: int = 32, seqlen: int = 256,
                    eval_windows: int | None = 300, corpora=("wikitext2",), calib: str = "wikitext2",
                    seed: int = 0, data_dir=None, progress: bool = True) -> list[dict]:
    """Quantize zoo model ``model_name`` with each ``{label: config}``; one row per label.

    Row fields: bits in both conventions, and per evaluation corpus ``<corpus>_ppl_fp``,
    ``<corpus>_ppl_q``, ``<corpus>_gap`` (ln PPL_q - ln PPL_fp), ``<corpus>_topk_kept`` (and per MoE layer: ``_by_layer``),
    ``<corpus>_kl``;
    quantization wall time.

    MoBiE is measured on its fake-quant weights (``packed=False``): bit for bit the packed tensors'
    ``dequantize()``, evaluated with the model's experts implementation as the full-precision model is (the
    packed ``"mobie"`` forward sums in another order: ~1e-6 relative), so the committed rows reproduce.
    """
    from dataclasses import replace

    import torch

    from ..pipeline import quantize_model
    from ..data import calibration_set, eval_windows as windows_of, load_text, tokenize_corpus
    from ..zoo import load_zoo_model
    from .metrics import compare_models

    fp, tok = load_zoo_model(model_name)
    calib_ids = calibration_set(calib, tok, nsamples, seqlen, seed, data_dir)
    tests = {c: windows_of(tokenize_corpus(load_text(c, "test", data_dir), tok), seqlen, max_windows=eval_windows)
             for c in corpora}
    rows = []
    for label, config in configs.items():
        q = copy.deepcopy(fp)
        torch.manual_seed(seed)
        t = time.perf_counter()
        if getattr(config, "packed", False):
            config = replace(config, packed=False)
        report = quantize_model(q, config, calib_ids, progress=progress)
        row = {"model": model_name, "method": label, "seed": seed, "calib": calib,
               "calib_tokens": nsamples * seqlen,
               "paper_bits": round(report.bits.paper_bits, 4),
               "all_inclusive_bits": round(report.bits.all_inclusive_bits, 4),
               "quant_seconds": round(time.perf_counter() - t, 1)}
        for corpus, w in tests.items():
            r = compare_models(fp, q, w)
            row.update({f"{corpus}_ppl_fp": round(r.ppl_fp, 4), f"{corpus}_ppl_q": round(r.ppl_q, 4),
                        f"{corpus}_gap": round(r.gap, 5), f"{corpus}_topk_kept": round(r.expert_shift.mean_topk_kept, 5),
                        f"{corpus}_topk_kept_by_layer": [round(v, 5) for v in r.expert_shift.topk_kept],
                        f"{corpus}_top1_changed": round(r.expert_shift.mean_top1_changed, 5),
                        f"{corpus}_kl": round(r.kl, 5), f"{corpus}_eval_tokens": r.n_tokens})
        rows.append(row)
        del q
    return rows


def group_by_method(rows: list[dict]) -> dict:
    """``{(model, method): [rows]}`` in first-seen order (one entry per seed/repeat)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    return groups


def format_table(rows: list[dict], cols: list[str]) -> str:
    """Plain fixed-width table (terminal) of the chosen columns."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)
