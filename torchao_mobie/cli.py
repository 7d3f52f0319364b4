"""``torchao-mobie`` command line: demo, zoo, quantize, eval, bench.

Errors a user can fix (a bad argument, a missing file, a corrupted checkpoint, a model this backend
does not support) print ``error: ...`` and exit with status 2, as argparse does for bad options; ``-v``
shows the traceback instead. Nothing the user had is modified by a failing command: ``quantize`` writes
into a temporary directory beside ``--out`` and swaps it in only once the checkpoint is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("sign", "billm", "arb-rc", "arb-x", "hbllm")
QUANT_METHODS = ("mobie", "billm", "arb", "arb-x", "arb-rc", "hbllm", "sign", "mobie-no-cejd", "mobie-no-glas", "mobie-no-nges",
                 "mobie-no-route_weighted")
PPL_CORPORA = ("wikitext2", "ptb")
REPORT_NAME = "mobie_quantize.json"


class CLIError(Exception):
    """A problem with the command's input, reported as ``error: <message>`` (no traceback)."""


def make_config(method: str, **kw):
    """The config object for a method name used on the command line; ``name:key=value,...`` sets config
    fields (values as Python literals), e.g. ``mobie:rounds=1,glas_samples=8``."""
    import ast

    from . import baselines as B, config as C

    if ":" in method:
        method, _, spec = method.partition(":")
        for item in filter(None, spec.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SystemExit(f"error: method spec {item!r} in {method}:{spec} is not key=value")
            try:
                kw[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kw[key.strip()] = value.strip()  # a bare word: a string field (e.g. side=input)

    table = {
        "sign": lambda: B.SignBinaryConfig(**kw),
        "billm": lambda: B.BiLLMConfig(**kw),
        "arb": lambda: B.ARBLLMConfig(variant="arb", **kw),
        "arb-x": lambda: B.ARBLLMConfig(variant="x", **kw),
        "arb-rc": lambda: B.ARBLLMConfig(variant="rc", **kw),
        "hbllm": lambda: B.HBLLMConfig(**kw),
    }
    if hasattr(C, "MoBiEConfig"):
        table["mobie"] = lambda: C.MoBiEConfig(**kw)
        for part in ("cejd", "glas", "nges", "route_weighted"):  # ablations: MoBiE with one component off
            table[f"mobie-no-{part}"] = lambda part=part: C.MoBiEConfig(**{part: False}, **kw)
    if method not in table:
        raise SystemExit(f"error: --method {method!r} is not known; expected one of {sorted(table)}")
    try:
        return table[method]()
    except (TypeError, ValueError) as e:  # an unknown field name, or a value the config rejects
        raise SystemExit(f"error: --method {method}: {e}") from None


def cmd_demo(args):
    from .zoo import DEFAULT_MODEL

    methods = args.methods or (["mobie"] if _has_mobie() else []) + ["hbllm", "arb-x", "billm", "sign"]
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
    if args.plot:
        from .eval.plots import plot_gap_vs_bits

        print(f"wrote {plot_gap_vs_bits(rows, args.plot)}")


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


# --------------------------------------------------------------------------------------------------
# Shared helpers: argument types, model loading, data, output directories
# --------------------------------------------------------------------------------------------------


def _int_at_least(lo: int, what: str):
    """argparse type: an int >= ``lo`` (``what`` names the expectation in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from e


def _check_data_dir(data_dir) -> None:
    """Fail before loading a model: a typo in --data-dir should not cost a model load."""
    if data_dir is None:
        return
    d = Path(data_dir).expanduser()
    if not d.exists():
        raise CLIError(f"--data-dir {data_dir}: no such directory (expected a folder laid out like shared/data: "
                       "wikitext-2-raw/, wikitext-2/, ptb/)")
    if not d.is_dir():
        raise CLIError(f"--data-dir {data_dir}: is not a directory")
    if not os.access(d, os.R_OK | os.X_OK):
        raise CLIError(f"--data-dir {data_dir}: directory is not readable (permissions)")


def _model_path(spec: str, opt: str) -> Path:
    """Local checkpoint directory of ``spec`` (a directory or a zoo model name)."""
    from .zoo import ZOO, zoo_path

    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CLIError(f"{opt} {spec}: is a file; expected a Hugging Face checkpoint directory (config.json + "
                           "*.safetensors) or a zoo model name")
        if not (p / "config.json").is_file():
            raise CLIError(f"{opt} {spec}: no config.json in this directory; expected a Hugging Face checkpoint "
                           "directory (config.json + *.safetensors)")
        return p.resolve()
    if spec in ZOO:
        try:
            return zoo_path(spec)
        except FileNotFoundError as e:
            raise CLIError(f"{opt} {spec}: {e}") from e
    raise CLIError(f"{opt} {spec}: no such directory, and not a zoo model name (zoo: {', '.join(ZOO)})")


def _save_dtype(name: str, hf_cfg):
    """The dtype the unquantized weights are saved in: ``auto`` = the source checkpoint's (a bf16 model
    quantized in float32 must not come back with float32 embeddings, attention and head: twice their bytes)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    src = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
    src = getattr(torch, str(src).replace("torch.", ""), None) if src is not None else None
    return src if isinstance(src, torch.dtype) and src.is_floating_point else torch.float32


def _cast_unquantized(model, dtype) -> None:
    """Cast every plain floating parameter (not the packed experts) to ``dtype``; buffers keep theirs (e.g.
    DeepSeek's fp32 ``e_score_correction_bias``)."""
    import torch

    from .storage import MoBiETensor

    for p in model.parameters():  # in place: tied parameters (embeddings / head) stay one tensor
        if not isinstance(p.data, MoBiETensor) and type(p.data) is torch.Tensor and p.is_floating_point():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def _read_config(path: Path, opt: str, spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # unknown model_type, malformed JSON, ...
        raise CLIError(f"{opt} {spec}: cannot read {path / 'config.json'}: {e}") from e


def _load_model(spec: str, opt: str, dtype: str, device, *, tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, checkpoint path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .storage import MoBiECheckpointError
    from .zoo import ZOO, load_zoo_model

    path = _model_path(spec, opt)
    cfg = _read_config(path, opt, spec)
    t = _dtype(dtype)
    try:
        if spec in ZOO and not Path(spec).expanduser().exists():
            if t == "auto":
                t = getattr(torch, str(getattr(cfg, "dtype", None) or "float32").replace("torch.", ""), torch.float32)
            model, tok = load_zoo_model(spec, dtype=t)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=t)
            tok = None
    except MoBiECheckpointError as e:
        raise CLIError(f"{opt} {spec}: {e}") from e
    except Exception as e:
        raise CLIError(f"{opt} {spec}: cannot load the checkpoint: {type(e).__name__}: {e}") from e
    if tokenizer and tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise CLIError(f"{opt} {spec}: no usable tokenizer in the checkpoint ({type(e).__name__}: {e}); text "
                           "cannot be tokenized") from e
    return model.to(device).eval(), tok, path


def _max_positions(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    v = getattr(cfg, "max_position_embeddings", None)
    return v if isinstance(v, int) else None


def _check_seqlen(opt: str, seqlen: int, cfg, what: str) -> None:
    max_pos = _max_positions(cfg)
    if max_pos is not None and seqlen > max_pos:
        raise CLIError(f"{opt} {seqlen} is longer than the context of {what} (config.max_position_embeddings="
                       f"{max_pos}); use {opt} <= {max_pos}")


def _check_token_ids(ids, model, opt: str, spec: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise CLIError(f"{opt} {spec}: its tokenizer produces token id {int(ids.max())}, outside the model's "
                       f"vocabulary [0, {vocab}); tokenizer and weights do not belong together")


def _text(source: str, split: str, data_dir, opt: str) -> tuple[str, str]:
    """(text, description) of a corpus split or of a local text file."""
    from .data import CORPORA, load_text

    if source in CORPORA:
        return load_text(source, split, data_dir), f"{source}/{split}"
    p = Path(source).expanduser()
    if not p.exists():
        raise CLIError(f"{opt} {source}: not a known corpus ({', '.join(CORPORA)}) and no such file")
    if not p.is_file():
        raise CLIError(f"{opt} {source}: is not a file; expected a corpus name ({', '.join(CORPORA)}) or a UTF-8 "
                       "text file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{opt} {source}: cannot read it as UTF-8 text ({e})") from e
    if not text.strip():
        raise CLIError(f"{opt} {source}: the file is empty")
    return text, str(p.resolve())


def _check_out_dir(out: Path, model_path: Path, force: bool) -> Path:
    out = out.expanduser().resolve()
    if out == model_path or model_path in out.parents:
        raise CLIError(f"--out {out}: is the input model directory or inside it; write the quantized model elsewhere "
                       "(the input checkpoint is never modified)")
    if out in model_path.parents:
        raise CLIError(f"--out {out}: contains the input model directory ({model_path}); replacing it would delete the "
                       "input; write the quantized model elsewhere")
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise CLIError(f"--out {out}: directory exists and is not empty; pass --force to replace it (the new model "
                           "is written beside it and swapped in only once complete)")
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames, restoring ``out`` if the second rename fails."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def _mb(nbytes) -> str:
    return f"{nbytes / 1e6:.3f} MB"


# --------------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------------


def cmd_quantize(args):
    import torch
    from torchao.core.config import config_to_dict

    from .api import MARKER, quantize_model
    from .mobie import MoBiEConfig
    from .data import CORPORA, calibration_samples, tokenize_corpus
    from .integrations.transformers import discover_moe_layout
    from .storage import memory_report
    from .storage.convert import check_packable

    t_start = time.perf_counter()
    cfg = make_config(args.method)
    model_path = _model_path(args.model, "--model")
    out = _check_out_dir(Path(args.out), model_path, args.force)
    # a mix "wikitext2+ptb" (or of files) shares the windows out evenly; an existing file is never split
    calib_parts = [args.calib] if Path(args.calib).expanduser().exists() else args.calib.split("+")
    if any(p in CORPORA for p in calib_parts):
        _check_data_dir(args.data_dir)

    # everything that the config alone tells, before loading weights
    hf_cfg = _read_config(model_path, "--model", args.model)
    qc = getattr(hf_cfg, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise CLIError(f"--model {args.model}: is already quantized (config.json has quantization_config with "
                       f"quant_method={method!r}); quantize the full-precision checkpoint")
    if getattr(hf_cfg, MARKER, None):
        raise CLIError(f"--model {args.model}: is already quantized (config.json has {MARKER}="
                       f"{getattr(hf_cfg, MARKER)}); quantize the full-precision checkpoint")
    _check_seqlen("--seqlen", args.seqlen, hf_cfg, f"--model {args.model}")
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as e:
        raise CLIError(f"--model {args.model}: not a causal LM transformers can build ({type(e).__name__}: {e})") from e
    try:
        layout = discover_moe_layout(skeleton)
    except ValueError as e:
        raise CLIError(f"--model {args.model}: {e}") from e
    # MoBiEConfig packs by default (packed=True); --no-pack, or a layout MoBiETensor cannot hold, keeps fake-quant
    packed = isinstance(cfg, MoBiEConfig) and not args.no_pack
    why_fake = "--no-pack" if isinstance(cfg, MoBiEConfig) else f"{type(cfg).__name__} has no packed format"
    if packed:
        try:
            for e in layout.experts():
                check_packable(e.module, e.fqn)
        except NotImplementedError as e:  # e.g. transposed experts: keep the work, save fake-quant
            logging.getLogger("torchao_mobie").warning("cannot pack this model (%s); saving it fake-quant", e)
            packed, why_fake = False, f"packing not supported: {e}"
    if isinstance(cfg, MoBiEConfig):
        cfg = dataclasses.replace(cfg, packed=packed)
    del skeleton, layout

    t = time.perf_counter()
    texts = [_text(p, "train", args.data_dir, "--calib") for p in calib_parts]  # fails before the load
    source = " + ".join(src for _, src in texts)
    timing = {"calibration_data_s": time.perf_counter() - t}

    t = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model, tok, _ = _load_model(args.model, "--model", args.dtype, _device(args.device))
    timing["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"tokenizing calibration text ({source}) ...", flush=True)
    streams = [tokenize_corpus(text, tok) for text, _ in texts]
    del texts
    try:
        calib = calibration_samples(streams, args.nsamples, args.seqlen, args.seed)
    except ValueError as e:
        raise CLIError(f"--calib {args.calib}: {e}; use a longer text or a smaller --seqlen") from e
    timing["calibration_data_s"] += time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    report = quantize_model(model, cfg, calib, progress=True, batch_size=args.batch_size)
    timing["quantize_s"] = time.perf_counter() - t
    print(report.summary(), flush=True)

    save_dtype = _save_dtype(args.save_dtype, hf_cfg)
    mem = memory_report(model)

    t = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        _cast_unquantized(model, save_dtype)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        timing["save_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t_start
        bits = report.bits
        info = {
            "command": ["torchao-mobie", *sys.argv[1:]] if args.argv is None else ["torchao-mobie", *args.argv],
            "model": args.model, "model_path": str(model_path), "method": args.method,
            "config": config_to_dict(cfg),
            "storage": "packed" if packed else "fake-quant",
            "calibration": {"source": source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                            "tokens": report.calibration_tokens},
            "bits": {"paper_bits": bits.paper_bits, "all_inclusive_bits": bits.all_inclusive_bits,
                     "budget": bits.as_dict(),
                     "per_parameter": {k: {"paper_bits": round(b.paper_bits, 4),
                                           "all_inclusive_bits": round(b.all_inclusive_bits, 4)}
                                       for k, b in report.parameters.items()}},
            "fallback_experts": {f"{e.module}.{e.projection}": e.experts for e in report.fallback_events},
            "memory": mem.as_dict(),
            "timing": {k: round(v, 3) for k, v in timing.items()},
            "dtype": str(save_dtype).replace("torch.", ""),
            "versions": _versions(),
        }
        _write_json(tmp / REPORT_NAME, info)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    print(f"bits per expert weight: {bits.paper_bits:.4f} (paper convention: sign planes + bitmaps), "
          f"{bits.all_inclusive_bits:.4f} (all-inclusive: every stored bit)")
    if packed:
        print(f"saved packed 1-bit checkpoint to {out}: experts {_mb(mem.experts_bytes)} "
              f"({mem.experts_ratio:.1%} of bf16), whole model {_mb(mem.model_bytes)}")
        print(f"reload: import torchao_mobie; AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        print(f"saved fake-quant checkpoint to {out} ({why_fake}): the dequantized binary weights are stored in "
              f"{info['dtype']}, so no memory is saved (the bits above are what a packed format needs)")
        print(f"reload: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print(f"evaluate: torchao-mobie eval --model {out} --reference {args.model}")


def _versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"torchao_mobie": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return "" if v is None else str(v)


def cmd_eval(args):
    from .data import eval_windows, load_text, tokenize_corpus
    from .eval.metrics import compare_models, perplexity
    from .eval.report import format_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError(f"--tasks {args.tasks!r}: no task names; expected e.g. wikitext2,ptb,wikitext2_mc_local")
    ppl_tasks = [t for t in tasks if t in PPL_CORPORA]
    lm_tasks = [t for t in tasks if t not in PPL_CORPORA]
    _check_data_dir(args.data_dir)
    if lm_tasks:
        from .integrations.lm_eval import _require_lm_eval

        _require_lm_eval()
    device = _device(args.device)
    model, tok, path = _load_model(args.model, "--model", args.dtype, device)
    ref = None
    if args.reference:
        ref, _, _ = _load_model(args.reference, "--reference", args.dtype, device, tokenizer=False)
        va, vb = model.get_input_embeddings().num_embeddings, ref.get_input_embeddings().num_embeddings
        if va != vb:
            raise CLIError(f"--reference {args.reference}: vocabulary of {vb} tokens, --model has {va}; the reference "
                           "must be the full-precision model the quantized one came from")
    if ppl_tasks:
        _check_seqlen("--seqlen", args.seqlen, model, f"--model {args.model}")

    results = {"model": args.model, "reference": args.reference, "seqlen": args.seqlen,
               "windows": args.windows or None, "perplexity": {}, "lm_eval": {}, "per_layer": {}}
    for corpus in ppl_tasks:
        ids = tokenize_corpus(load_text(corpus, "test", args.data_dir), tok)
        _check_token_ids(ids, model, "--model", args.model)
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
        from .integrations.lm_eval import evaluate_lm_eval

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
        _write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot_dir:
        if not results["per_layer"]:
            print("note: --plot-dir: the expert-agreement plot needs --reference and a perplexity task "
                  f"({', '.join(PPL_CORPORA)}); nothing plotted")
        from .eval.plots import plot_expert_agreement

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


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------


def cmd_bench(args):
    from .eval.report import format_table
    from .eval.speed import compiled_for_bench, throughput
    from .storage import memory_report

    device = _device(args.device)
    model, _, _ = _load_model(args.model, "--model", args.dtype, device, tokenizer=False)
    if args.experts_implementation:
        try:
            model.set_experts_implementation(args.experts_implementation)
        except Exception as e:
            raise CLIError(f"--experts-implementation {args.experts_implementation}: {e}") from e
    max_pos = _max_positions(model)
    if max_pos is not None and args.prompt_len + args.new_tokens > max_pos:
        raise CLIError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's context "
                       f"(config.max_position_embeddings={max_pos})")
    mem = memory_report(model)
    model, compiled, note = compiled_for_bench(model, device, args.compile)  # issue 19: CPU default on
    print(note)
    print(f"measuring {args.iters} x (prefill {args.batch_size}x{args.prompt_len} + decode {args.new_tokens} tokens) "
          f"on {device} ...", flush=True)
    speed = throughput(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch_size=args.batch_size,
                       iters=args.iters)
    speed["compiled"] = compiled
    rows = [{"component": k, "MB": f"{v / 1e6:.4f}"} for k, v in mem.components().items()]
    rows.append({"component": "total as stored", "MB": f"{mem.model_bytes / 1e6:.4f}"})
    rows.append({"component": "experts in bf16", "MB": f"{mem.experts_bf16_bytes / 1e6:.4f}"})
    rows.append({"component": "total in bf16", "MB": f"{mem.model_bf16_bytes / 1e6:.4f}"})
    print()
    print(format_table(rows, ["component", "MB"]))
    print(f"experts: {mem.experts_ratio:.1%} of bf16 ({mem.experts_bits_per_weight:.3f} bits/weight as stored), "
          f"{mem.packed_parameters} packed parameters; whole model {mem.model_ratio:.1%} of bf16")
    print(f"prefill {speed['prefill_tokens_per_s']:.1f} tokens/s, decode {speed['decode_tokens_per_s']:.1f} tokens/s "
          f"({speed['device']}, {speed['threads']} threads, {speed['dtype']}, experts implementation "
          f"{speed['experts_implementation']}, {'torch.compile' if compiled else 'eager'})")
    results = {"model": args.model, "memory": {**mem.as_dict(), "components": mem.components()}, "speed": speed}
    if args.json:
        _write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        from .eval.plots import plot_memory

        p = plot_memory(mem, args.plot, title=f"{Path(args.model).name}: memory per component",
                        stored_label=f"as loaded ({speed['dtype']})")
        print(f"wrote {p}")
    return results


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------

_DATA_HELP = ("folder with the corpora (laid out like shared/data); default: $MOBIE_DATA_DIR, then shared/data beside "
              "the checkout, then Hugging Face datasets")
_MODEL_HELP = "Hugging Face checkpoint directory or zoo model name (`torchao-mobie zoo list`)"
_DTYPE_HELP = ("dtype to load the weights in (float32: exact and fast on CPU; auto: the checkpoint's own)")


def _desc(*paragraphs: str) -> str:
    import textwrap

    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchao-mobie", description="1-bit quantization of MoE LLM experts (MoBiE).")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every step; show tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)  # -v after the command name too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log every step; show tracebacks on errors")
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
    d.add_argument("--plot", default=None, help="also write a PNG of the gap to full precision vs bits per method")
    d.set_defaults(fn=cmd_demo)
    z = sub.add_parser("zoo", help="list or train the reference zoo models")
    z.add_argument("action", choices=["list", "train"])
    z.add_argument("names", nargs="*", help="models to train (default: all)")
    z.set_defaults(fn=cmd_zoo)

    q = sub.add_parser(
        "quantize", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="binarize the experts of an MoE checkpoint and save it",
        description=_desc(
            "Binarize the routed experts of a Hugging Face MoE checkpoint with calibration data (sequential, GPTQ "
            "order) and save it with save_pretrained, its tokenizer and mobie_quantize.json (config, bits in both "
            "conventions, timing).",
            "MoBiE is packed to real 1-bit storage (reload with `import torchao_mobie`, then "
            "AutoModelForCausalLM.from_pretrained). billm / arb* / hbllm / sign are fake-quant: the dequantized binary "
            "weights are saved in the load dtype (they load with plain transformers; no memory is saved)."),
        epilog="example:\n  torchao-mobie quantize --model qwen3moe-32e --method mobie --out qwen3moe-32e-mobie")
    q.add_argument("--model", required=True, help=_MODEL_HELP + "; never modified")
    q.add_argument("--method", required=True, choices=QUANT_METHODS,
                   help="mobie (packed 1-bit), billm, arb (ARB-LLM), arb-x, arb-rc, hbllm (HBLLM), sign (naive floor); "
                        "mobie-no-* are ablations")
    q.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    q.add_argument("--force", action="store_true",
                   help="replace a non-empty --out; the old content stays until the new model is complete")
    q.add_argument("--calib", default="wikitext2",
                   help="calibration text: wikitext2, ptb, c4 (train splits) or a UTF-8 text file tokenized with the "
                        "model's tokenizer, or a mix joined by '+' (e.g. wikitext2+ptb: windows shared evenly; "
                        "default: wikitext2)")
    q.add_argument("--nsamples", type=_positive_int, default=32,
                   help="random calibration windows (default 32; the papers use 128 on 2048-token windows)")
    q.add_argument("--seqlen", type=_positive_int, default=256,
                   help="tokens per calibration window, at most the model's max_position_embeddings (default 256)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    q.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward (default 8)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help=_DTYPE_HELP + " for calibration and quantization (default float32)")
    q.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the weights that stay unquantized (embeddings, attention, norms, head, routers) in "
                        "the saved checkpoint; auto: the source checkpoint's (default)")
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--no-pack", action="store_true", help="MoBiE: save fake-quant weights instead of packed 1-bit")
    q.add_argument("--data-dir", default=None, help=_DATA_HELP)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser(
        "eval", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="perplexity / lm-eval tasks, optionally against a full-precision reference",
        description=_desc(
            "Evaluate a (quantized) checkpoint: perplexity on WikiText-2 / PTB test windows; with --reference also "
            "the log-perplexity gap ln(PPL) - ln(PPL_ref), the KL divergence of next-token distributions and the "
            "expert shift per MoE layer.",
            "Any other task name runs through lm-eval on the in-memory model (offline tasks shipped with "
            "torchao_mobie: wikitext2_local, ptb_local, wikitext2_mc_local, ptb_mc_local, wikitext2_mc_ctx_local, "
            "ptb_mc_ctx_local; hub tasks need the network)."),
        epilog="example:\n  torchao-mobie eval --model qwen3moe-32e-mobie --reference qwen3moe-32e \\\n"
               "      --tasks wikitext2,ptb,wikitext2_mc_local --json eval.json --plot-dir plots")
    e.add_argument("--model", required=True, help=_MODEL_HELP)
    e.add_argument("--reference", default=None, help="full-precision model to compare with (" + _MODEL_HELP + ")")
    e.add_argument("--tasks", default="wikitext2",
                   help="comma-separated: wikitext2, ptb (perplexity) and lm-eval task names (default: wikitext2)")
    e.add_argument("--windows", type=_nonneg_int, default=200,
                   help="perplexity windows per corpus, from the start of the test split (0 = all; default 200)")
    e.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per perplexity window (default 256)")
    e.add_argument("--limit", type=_positive_int, default=None, help="lm-eval: documents per task (default: all)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward (default 8)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help=_DTYPE_HELP + " (default float32)")
    e.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    e.add_argument("--data-dir", default=None, help=_DATA_HELP)
    e.add_argument("--json", default=None, help="write every figure (and per-layer expert shift) to this JSON file")
    e.add_argument("--plot-dir", default=None,
                   help="write expert_agreement_<corpus>.png (per-layer routing agreement; needs --reference)")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser(
        "bench", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="memory per component and prefill/decode tokens/s",
        description=_desc(
            "Memory of the loaded model per component (packed expert signs, scales, backbone, experts that are not "
            "packed, rest of the model) next to its size in bf16, and prefill / decode throughput (random prompt, "
            "greedy decode with a KV cache, median of --iters runs after one warm-up) under torch.inference_mode; on the CPU "
            "the model is torch.compiled first (--no-compile: eager), so packed experts run the fused CPU kernels."),
        epilog="example:\n  torchao-mobie bench --model qwen3moe-32e-mobie --json bench.json --plot memory.png")
    b.add_argument("--model", required=True, help=_MODEL_HELP)
    b.add_argument("--prompt-len", type=_positive_int, default=128, help="prefill tokens (default 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=32, help="decode steps (default 32)")
    b.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step (default 1)")
    b.add_argument("--iters", type=_positive_int, default=3, help="timed runs, median reported (default 3)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help=_DTYPE_HELP + " (default auto: memory as the checkpoint stores it)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    b.add_argument("--experts-implementation", default=None,
                   help="override the experts implementation (e.g. mobie, grouped_mm, eager)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model before timing (default: on for the CPU, where packed experts then "
                        "run the fused CPU kernels; the first, warm-up run compiles)")
    b.add_argument("--json", default=None, help="write memory and speed figures to this JSON file")
    b.add_argument("--plot", default=None, help="write a PNG bar plot of memory per component vs bf16")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.fn(args)
    except Exception as e:
        if verbose:
            raise
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"  {note}", file=sys.stderr)
        if not isinstance(e, CLIError):
            print("(run with -v for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
