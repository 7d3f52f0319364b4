"""``torchao-mobie eval``: perplexity and lm-eval tasks, optionally against the full-precision reference
(gap, KL, expert shift per layer)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    DATA_HELP,
    DTYPE_HELP,
    MODEL_HELP,
    PPL_CORPORA,
    REPORT_NAME,
    CLIError,
    check_data_dir,
    check_seqlen,
    check_token_ids,
    describe,
    device_of,
    load_model,
    nonneg_int,
    positive_int,
    write_json,
)

__all__ = ["add_parser", "cmd_eval"]


def add_parser(sub, common) -> None:
    e = sub.add_parser(
        "eval", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="perplexity / lm-eval tasks, optionally against a full-precision reference",
        description=describe(
            "Evaluate a (quantized) checkpoint: perplexity on WikiText-2 / PTB test windows; with --reference also "
            "the log-perplexity gap ln(PPL) - ln(PPL_ref), the KL divergence of next-token distributions and the "
            "expert shift per MoE layer.",
            "Any other task name runs through lm-eval on the in-memory model (offline tasks shipped with "
            "torchao_mobie: wikitext2_local, ptb_local, wikitext2_mc_local, ptb_mc_local, wikitext2_mc_ctx_local, "
            "ptb_mc_ctx_local; hub tasks need the network)."),
        epilog="example:\n  torchao-mobie eval --model qwen3moe-32e-mobie --reference qwen3moe-32e \\\n"
               "      --tasks wikitext2,ptb,wikitext2_mc_local --json eval.json --plot-dir plots")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--reference", default=None, help="full-precision model to compare with (" + MODEL_HELP + ")")
    e.add_argument("--tasks", default="wikitext2",
                   help="comma-separated: wikitext2, ptb (perplexity) and lm-eval task names (default: wikitext2)")
    e.add_argument("--windows", type=nonneg_int, default=200,
                   help="perplexity windows per corpus, from the start of the test split (0 = all; default 200)")
    e.add_argument("--seqlen", type=positive_int, default=256, help="tokens per perplexity window (default 256)")
    e.add_argument("--limit", type=positive_int, default=None, help="lm-eval: documents per task (default: all)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help=DTYPE_HELP + " (default float32)")
    e.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    e.add_argument("--data-dir", default=None, help=DATA_HELP)
    e.add_argument("--json", default=None, help="write every figure (and per-layer expert shift) to this JSON file")
    e.add_argument("--plot-dir", default=None,
                   help="write expert_agreement_<corpus>.png (per-layer routing agreement; needs --reference)")
    e.set_defaults(fn=cmd_eval)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return "" if v is None else str(v)


def cmd_eval(args):
    from ..data import eval_windows, load_text, tokenize_corpus
    from ..eval.metrics import compare_models, perplexity
    from ..eval.report import format_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError(f"--tasks {args.tasks!r}: no task names; expected e.g. wikitext2,ptb,wikitext2_mc_local")
    ppl_tasks = [t for t in tasks if t in PPL_CORPORA]
    lm_tasks = [t for t in tasks if t not in PPL_CORPORA]
    check_data_dir(args.data_dir)
    if lm_tasks:
        from ..integrations.lm_eval import _require_lm_eval

        _require_lm_eval()
    device = device_of(args.device)
    model, tok, path = load_model(args.model, "--model", args.dtype, device)
    ref = None
    if args.reference:
        ref, _, _ = load_model(args.reference, "--reference", args.dtype, device, tokenizer=False)
        va, vb = model.get_input_embeddings().num_embeddings, ref.get_input_embeddings().num_embeddings
        if va != vb:
            raise CLIError(f"--reference {args.reference}: vocabulary of {vb} tokens, --model has {va}; the reference "
                           "must be the full-precision model the quantized one came from")
    if ppl_tasks:
        check_seqlen("--seqlen", args.seqlen, model, f"--model {args.model}")

    results = {"model": args.model, "reference": args.reference, "seqlen": args.seqlen,
               "windows": args.windows or None, "perplexity": {}, "lm_eval": {}, "per_layer": {}}
    for corpus in ppl_tasks:
        ids = tokenize_corpus(load_text(corpus, "test", args.data_dir), tok)
        check_token_ids(ids, model, "--model", args.model)
        w = eval_windows(ids, args.seqlen, max_windows=args.windows or None)
        if ref is None:
            results["perplexity"][corpus] = {"ppl": perplexity(model, w, args.batch_size, progress=True),
                                             "tokens": w.numel() - w.shape[0]}
        else:
            r = compare_models(ref, model, w, args.batch_size, progress=True)
            results["perplexity"][corpus] = {"ppl": r.ppl_q, "ppl_ref": r.ppl_fp, "gap": r.gap, "kl": r.kl,
                                             "topk_kept": r.expert_shift.mean_topk_kept,
                                             "top1_changed": r.expert_shift.mean_top1_changed, "tokens": r.n_tokens}
            results["per_layer"][corpus] = {"topk_kept": r.expert_shift.topk_kept,
                                            "top1_changed": r.expert_shift.top1_changed}
    if lm_tasks:
        from ..integrations.lm_eval import evaluate_lm_eval

        kw = dict(limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir, device=str(device))
        results["lm_eval"]["model"] = evaluate_lm_eval(model, tok, lm_tasks, **kw)
        if ref is not None:
            results["lm_eval"]["reference"] = evaluate_lm_eval(ref, tok, lm_tasks, **kw)

    print()
    if results["perplexity"]:
        cols = (["task", "ppl", "ppl_ref", "gap", "kl", "topk_kept", "top1_changed", "tokens"] if ref is not None
                else ["task", "ppl", "tokens"])
        rows = [{"task": c, **{k: _fmt(v) for k, v in r.items()}} for c, r in results["perplexity"].items()]
        print(format_table(rows, cols))
        if ref is not None:
            print("gap = ln(PPL) - ln(PPL_ref); kl = KL(p_ref || p) per token (nats); topk_kept = share of the "
                  "reference's top-k expert assignments kept; top1_changed = share of tokens whose top-1 expert changed")
    if lm_tasks:
        rows = []
        for task, metrics in results["lm_eval"]["model"].items():
            for metric, v in metrics.items():
                if metric.endswith("_stderr") or metric == "n_samples":
                    continue
                row = {"task": task, "metric": metric, "value": _fmt(v), "n": metrics.get("n_samples")}
                if ref is not None:
                    row["reference"] = _fmt(results["lm_eval"]["reference"].get(task, {}).get(metric))
                rows.append(row)
        print()
        print(format_table(rows, ["task", "metric", "value"] + (["reference"] if ref is not None else []) + ["n"]))
    if ref is None and ppl_tasks:
        src = _quantized_from(path)
        if src:
            print(f"\nhint: --reference {src} adds the gap, KL and expert shift against the model this one was "
                  "quantized from")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot_dir:
        if not results["per_layer"]:
            print("note: --plot-dir: the expert-agreement plot needs --reference and a perplexity task "
                  f"({', '.join(PPL_CORPORA)}); nothing plotted")
        from ..eval.plots import plot_expert_agreement

        for corpus, layers in results["per_layer"].items():
            p = plot_expert_agreement(layers["topk_kept"], layers["top1_changed"],
                                      Path(args.plot_dir) / f"expert_agreement_{corpus}.png",
                                      title=f"{Path(args.model).name} vs {Path(args.reference).name}: {corpus}")
            print(f"wrote {p}")
    return results


def _quantized_from(path: Path) -> str | None:
    try:
        return json.loads((path / REPORT_NAME).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
