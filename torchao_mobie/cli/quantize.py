"""``torchao-mobie quantize``: calibrate, binarize and save a checkpoint (never touching the input).

Writes into a temporary directory beside ``--out`` and swaps it in only once the checkpoint is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .. import workers
from ..methods.registry import QUANT_METHODS
from ..pipeline.stream_state import MANIFEST as STREAM_MANIFEST
from .common import (
    DATA_HELP,
    DTYPE_HELP,
    MODEL_HELP,
    REPORT_NAME,
    CLIError,
    check_data_dir,
    check_seqlen,
    describe,
    device_of,
    load_model,
    make_config,
    mb,
    checkpoint_dir,
    positive_int,
    read_config,
    read_text,
    write_json,
)

__all__ = ["add_parser", "cmd_quantize"]


def add_parser(sub, common) -> None:
    q = sub.add_parser(
        "quantize", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="binarize the experts of an MoE checkpoint and save it",
        description=describe(
            "Binarize the routed experts of a Hugging Face MoE checkpoint with calibration data (sequential, GPTQ "
            "order) and save it with save_pretrained, its tokenizer and mobie_quantize.json (config, bits in both "
            "conventions, timing).",
            "MoBiE is packed to real 1-bit storage (reload with `import torchao_mobie`, then "
            "AutoModelForCausalLM.from_pretrained). billm / arb* / hbllm / sign are fake-quant: the dequantized binary "
            "weights are saved in the load dtype (they load with plain transformers; no memory is saved)."),
        epilog="example:\n  torchao-mobie quantize --model qwen3moe-32e --method mobie --out qwen3moe-32e-mobie")
    q.add_argument("--model", required=True, help=MODEL_HELP + "; never modified")
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
    q.add_argument("--nsamples", type=positive_int, default=32,
                   help="random calibration windows (default 32; the papers use 128 on 2048-token windows)")
    q.add_argument("--seqlen", type=positive_int, default=256,
                   help="tokens per calibration window, at most the model's max_position_embeddings (default 256)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward (default 8)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help=DTYPE_HELP + " for calibration and quantization (default float32)")
    q.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the weights that stay unquantized (embeddings, attention, norms, head, routers) in "
                        "the saved checkpoint; auto: the source checkpoint's (default)")
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--no-pack", action="store_true", help="MoBiE: save fake-quant weights instead of packed 1-bit")
    q.add_argument("--data-dir", default=None, help=DATA_HELP)
    q.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="streaming: read --model (safetensors, one file or hub shards) one decoder layer at a time and "
                        "write each finished layer to --out at once (memory: about one layer plus the calibration "
                        "activations). Rerunning the same command after a crash resumes after the last finished "
                        "layer; other settings refuse to resume into that --out. CPU only. Default: streaming when "
                        f"the model does not fit (its weights at the load dtype x {NEED_FACTOR} + "
                        f"{NEED_EXTRA_GB:g} GB above the available memory); --no-stream loads it whole")
    q.set_defaults(fn=cmd_quantize)


def cmd_quantize(args):
    import torch
    from torchao.core.config import config_to_dict

    from ..data import CORPORA, calibration_samples, tokenize_corpus
    from ..integrations.transformers import discover_moe_layout
    from ..marker import MARKER
    from ..mobie import MoBiEConfig
    from ..pipeline import quantize_model
    from ..storage import memory_report
    from ..storage.convert import check_packable

    t_start = time.perf_counter()
    cfg = make_config(args.method)
    model_path = checkpoint_dir(args.model, "--model")
    if args.stream is None:
        args.stream = _stream_by_default(args, model_path)
    # under torchrun: join the process group; the ranks split the experts, rank 0 writes (torchao_mobie.workers)
    workers.init_from_env(str(device_of(args.device)))
    if not workers.is_writer():  # one rank reports
        logging.getLogger("torchao_mobie").setLevel(logging.ERROR)
    out = _check_out_dir(Path(args.out), model_path, args.force, stream=args.stream)
    workers.barrier()  # every rank has checked --out before rank 0 writes anything
    # a mix "wikitext2+ptb" (or of files) shares the windows out evenly; an existing file is never split
    calib_parts = [args.calib] if Path(args.calib).expanduser().exists() else args.calib.split("+")
    if any(p in CORPORA for p in calib_parts):
        check_data_dir(args.data_dir)

    # everything that the config alone tells, before loading weights
    hf_cfg = read_config(model_path, "--model", args.model)
    qc = getattr(hf_cfg, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise CLIError(f"--model {args.model}: is already quantized (config.json has quantization_config with "
                       f"quant_method={method!r}); quantize the full-precision checkpoint")
    if getattr(hf_cfg, MARKER, None):
        raise CLIError(f"--model {args.model}: is already quantized (config.json has {MARKER}="
                       f"{getattr(hf_cfg, MARKER)}); quantize the full-precision checkpoint")
    check_seqlen("--seqlen", args.seqlen, hf_cfg, f"--model {args.model}")
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
        except NotImplementedError as e:  # a layout MoBiETensor cannot hold (none that discovery accepts today)
            logging.getLogger("torchao_mobie").warning("cannot pack this model (%s); saving it fake-quant", e)
            packed, why_fake = False, f"packing not supported: {e}"
    if isinstance(cfg, MoBiEConfig):
        cfg = dataclasses.replace(cfg, packed=packed)
    del skeleton, layout

    t = time.perf_counter()
    texts = [read_text(p, "train", args.data_dir, "--calib") for p in calib_parts]  # fails before the load
    source = " + ".join(src for _, src in texts)
    timing = {"calibration_data_s": time.perf_counter() - t}

    if args.stream:
        return _cmd_stream(args, cfg, model_path, out, hf_cfg, texts, source, timing, t_start, packed)

    t = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model, tok, _ = load_model(args.model, "--model", args.dtype, device_of(args.device))
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
    report = quantize_model(model, cfg, calib, progress=workers.is_writer(), batch_size=args.batch_size)
    timing["quantize_s"] = time.perf_counter() - t
    if not workers.is_writer():
        return
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
            "storage": "packed" if packed else "fake-quant", "workers": workers.world_size(),
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
        write_json(tmp / REPORT_NAME, info)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    print(f"bits per expert weight: {bits.paper_bits:.4f} (paper convention: sign planes + bitmaps), "
          f"{bits.all_inclusive_bits:.4f} (all-inclusive: every stored bit)")
    if packed:
        print(f"saved packed 1-bit checkpoint to {out}: experts {mb(mem.experts_bytes)} "
              f"({mem.experts_ratio:.1%} of bf16), whole model {mb(mem.model_bytes)}")
        print(f"reload: import torchao_mobie; AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        print(f"saved fake-quant checkpoint to {out} ({why_fake}): the dequantized binary weights are stored in "
              f"{info['dtype']}, so no memory is saved (the bits above are what a packed format needs)")
        print(f"reload: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print(f"evaluate: torchao-mobie eval --model {out} --reference {args.model}")


def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {"torchao_mobie": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


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

    from ..storage import MoBiETensor

    for p in model.parameters():  # in place: tied parameters (embeddings / head) stay one tensor
        if not isinstance(p.data, MoBiETensor) and type(p.data) is torch.Tensor and p.is_floating_point():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


# the memory rule of automatic streaming: an in-memory run holds the model at its load dtype, the per-expert
# statistics and the calibration activations (measured on the zoo: peak RSS 1.2-1.5x the fp32 weights, + torch)
NEED_FACTOR = 1.5
NEED_EXTRA_GB = 1.0


def _weight_numel(model_path: Path) -> tuple[int, int]:
    """(floating elements, their stored bytes) over the checkpoint's safetensors files, from the headers."""
    from ..storage.hub_checkpoint import DTYPE_BYTES, FLOAT_DTYPES, tensor_sizes

    sizes = [(dt, n) for dt, n in tensor_sizes(sorted(model_path.glob("*.safetensors"))) if dt in FLOAT_DTYPES]
    return sum(n for _, n in sizes), sum(n * DTYPE_BYTES[dt] for dt, n in sizes)


def _available_bytes(device) -> int:
    """Free memory where the model would be loaded: GPU free memory, else the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _stream_by_default(args, model_path: Path) -> bool:
    """Stream when the model does not fit (the rule above); say so."""
    numel, stored = _weight_numel(model_path)
    per = {"float32": 4, "bfloat16": 2}.get(args.dtype)
    need = (numel * per if per else stored) * NEED_FACTOR + NEED_EXTRA_GB * 2**30
    device = device_of(args.device)
    avail = _available_bytes(device)
    if need <= avail:
        return False
    if device.type != "cpu":
        if args.device != "auto":
            raise CLIError(f"--device {args.device}: the model needs about {need / 2**30:.1f} GiB there and "
                           f"{avail / 2**30:.1f} GiB are free; stream it on the CPU (--device cpu) or use a larger device")
        args.device = "cpu"
    print(f"note: --model {args.model} needs about {need / 2**30:.1f} GiB in memory ({numel / 1e9:.2f} B weights at "
          f"--dtype {args.dtype}), {avail / 2**30:.1f} GiB are available: streaming it layer by layer on the CPU "
          "(--no-stream loads it whole)", flush=True)
    return True


def _check_out_dir(out: Path, model_path: Path, force: bool, stream: bool = False) -> Path:
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
        if stream and (out / STREAM_MANIFEST).is_file() and not force:
            return out  # a streaming run to resume (quantize_streaming checks its settings)
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


def _cmd_stream(args, cfg, model_path: Path, out: Path, hf_cfg, texts, source, timing, t_start, packed):
    """``--stream``: :func:`~torchao_mobie.pipeline.streaming.quantize_streaming` straight into ``--out``."""
    import torch
    from torchao.core.config import config_to_dict
    from transformers import AutoTokenizer

    from ..data import calibration_samples, tokenize_corpus
    from ..pipeline.stream_state import StreamResumeError
    from ..pipeline.streaming import quantize_streaming
    from .common import parse_dtype

    if device_of(args.device).type != "cpu":
        raise CLIError(f"--device {args.device}: --stream runs on CPU (the layer-by-layer loader materializes on CPU)")
    dtype = parse_dtype(args.dtype)
    if dtype == "auto":
        dtype = _save_dtype("auto", hf_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:
        raise CLIError(f"--model {args.model}: no usable tokenizer in the checkpoint ({type(e).__name__}: {e})") from e
    t = time.perf_counter()
    streams = [tokenize_corpus(text, tok) for text, _ in texts]
    try:
        calib = calibration_samples(streams, args.nsamples, args.seqlen, args.seed)
    except ValueError as e:
        raise CLIError(f"--calib {args.calib}: {e}; use a longer text or a smaller --seqlen") from e
    timing["calibration_data_s"] += time.perf_counter() - t
    if args.force and out.exists() and workers.is_writer():
        shutil.rmtree(out)
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        report = quantize_streaming(model_path, out, cfg, calib, batch_size=args.batch_size, dtype=dtype,
                                    experts_implementation="grouped_mm", save_dtype=_save_dtype(args.save_dtype, hf_cfg),
                                    progress=workers.is_writer())
    except StreamResumeError as e:
        raise CLIError(f"--out {out}: {e}") from e
    timing["quantize_s"] = time.perf_counter() - t
    if not workers.is_writer():
        return
    tok.save_pretrained(out)
    timing["total_s"] = time.perf_counter() - t_start
    bits = report.bits
    write_json(out / REPORT_NAME, {
        "command": ["torchao-mobie", *sys.argv[1:]] if args.argv is None else ["torchao-mobie", *args.argv],
        "model": args.model, "model_path": str(model_path), "method": args.method, "config": config_to_dict(cfg),
        "storage": "packed" if packed else "fake-quant", "streaming": True,
        "workers": workers.world_size(),
        "calibration": {"source": source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                        "tokens": report.calibration_tokens},
        "bits": {"paper_bits": bits.paper_bits, "all_inclusive_bits": bits.all_inclusive_bits, "budget": bits.as_dict()},
        "timing": {k: round(v, 3) for k, v in timing.items()}, "versions": _versions()})
    print(report.summary(), flush=True)
    print(f"saved {'packed 1-bit' if packed else 'fake-quant'} checkpoint to {out} (streaming, layer by layer)")
    print(f"reload: import torchao_mobie; AutoModelForCausalLM.from_pretrained({str(out)!r})")
