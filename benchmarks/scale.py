"""Streaming quantization at real size: a Qwen3-30B-A3B-shaped checkpoint, time per layer, peak memory, workers.

    python benchmarks/scale.py                                     # CPU: 4 layers, mobie billm arb-x, depths 2 4 8
    python benchmarks/scale.py --device cuda --nsamples 128 --seqlen 2048      # on a GPU (*)
    python benchmarks/scale.py --experts 8 --topk 1 --layers 1 --depths 1 --workers 1 --methods mobie billm \
        --nsamples 8 --seqlen 128 --name scale_probe_e8                # real width, 8 experts: a quick probe
    python benchmarks/scale.py --tiny                              # smoke test at toy width (results: scale_tiny)
    torchrun --nproc-per-node 2 -m torchao_mobie.cli quantize --model DIR --stream --method mobie --out OUT  # by hand

The checkpoint (issue 18, deliverable 5) is Qwen3-30B-A3B's decoder at real dimensions (hidden 2048, 128 experts
of width 768, top-8, normalized top-k, GQA attention with 32 query heads, 4 KV heads of width 128) truncated to
as many layers as the sweep needs, with a small vocabulary (``--vocab``, default 512: the real 151936 would add
2 x 311M parameters of embeddings and head that are never quantized). Weights are random (normal, std 0.02;
norms 1), deterministic (one seeded generator per tensor), bf16, written one decoder layer per safetensors shard
in hub layout (per-expert ``mlp.experts.N.{gate,up,down}_proj.weight`` keys, ``model.safetensors.index.json``)
without holding more than one layer in memory; shallower depths are views of it (a ``config.json`` with fewer
layers, an index of the first shards, symlinks). It is built once under ``--workdir`` and reused while its
spec matches.

Each measurement runs in a fresh process (``ru_maxrss`` is per process): ``quantize_streaming`` of the checkpoint
with ``--nsamples`` x ``--seqlen`` random calibration token ids (seed 0), ``--threads`` threads per process,
``--dtype`` compute (float32). (*) On CUDA the child passes ``device=`` to ``quantize_streaming`` and fails,
recorded, while streaming has no such argument (today it runs on CPU only). Recorded: total seconds, seconds per
layer (total / layers, and the time of each layer of the sequential pass), peak host RSS, peak GPU memory (CUDA),
and for MoBiE the GLAS share (layer-wise GLAS: ``forward_boundaries`` + ``layerwise_glas_weights``, timed around
the calls). Then MoBiE's peak RSS at each of ``--depths`` and its time with each of ``--workers`` processes (N > 1:
``python -m torch.distributed.run --standalone --nproc-per-node N``; the ranks are expected to split each layer's
experts through ``torchao_mobie.workers``, joined as the CLI does; if that module is absent or the launch fails,
the error is recorded). The projection to 128 x 2048 calibration tokens and 48 layers is linear: seconds per layer
x (262144 / measured tokens) x 48; the token-independent work (Hessian inverses, binarization) makes it an upper
bound. Writes benchmarks/results/<name>.{json,md} (default name: scale_<device>), after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_TOKENS = 128 * 2048
TARGET_LAYERS = 48
REAL = {"hidden": 2048, "experts": 128, "inter": 768, "topk": 8, "heads": 32, "kv_heads": 4, "head_dim": 128}
TINY = {"hidden": 64, "experts": 32, "inter": 32, "topk": 4, "heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2,
        "depths": [2, 3], "nsamples": 4, "seqlen": 32, "name": "scale_tiny"}
SPEC_NAME = "scale_spec.json"

CHILD = r'''
import inspect, json, os, resource, sys, time
spec = json.loads(sys.argv[1])
import torch
import torch.distributed as dist
torch.set_num_threads(spec["threads"])
inits = []
_init = dist.init_process_group
def init_process_group(*a, **k):  # patched before the package is imported: did the run use torch.distributed?
    inits.append(k.get("backend", a[0] if a else None))
    return _init(*a, **k)
dist.init_process_group = init_process_group
import tqdm.auto
from torchao_mobie.cli import make_config
from torchao_mobie.pipeline import streaming

rank = int(os.environ.get("RANK", "0"))
timers = {"glas_forward_s": 0.0, "glas_backward_s": 0.0}
def timed(name, fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers[name] += time.perf_counter() - t
    return wrap
streaming.forward_boundaries = timed("glas_forward_s", streaming.forward_boundaries)
streaming.layerwise_glas_weights = timed("glas_backward_s", streaming.layerwise_glas_weights)
layer_s = []
def layer_loop(items, **kw):  # quantize_streaming's tqdm over the decoder layers: time each layer
    for x in items:
        t = time.perf_counter()
        yield x
        layer_s.append(time.perf_counter() - t)
tqdm.auto.tqdm = layer_loop
kw = {}
dev = torch.device(spec["device"])
if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: join the group as the CLI does
    try:
        from torchao_mobie import workers
    except ImportError:
        from torchao_mobie.pipeline import workers
    workers.init_from_env(str(dev))
if dev.type != "cpu":
    if "device" not in inspect.signature(streaming.quantize_streaming).parameters:
        raise SystemExit(f"quantize_streaming has no device argument: streaming runs on CPU only, not {dev}")
    kw["device"] = dev
    torch.cuda.reset_peak_memory_stats(dev)
calib = torch.randint(3, spec["vocab"], (spec["nsamples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0))
cfg = make_config(spec["method"])
torch.manual_seed(0)
t0 = time.perf_counter()
rep = streaming.quantize_streaming(spec["src"], spec["out"], cfg, calib, batch_size=spec["batch_size"],
                                   dtype=getattr(torch, spec["dtype"]), progress=False, **kw)
res = {"rank": rank, "seconds": time.perf_counter() - t0, "layer_seconds": layer_s, **timers,
       "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "calibration_tokens": rep.calibration_tokens, "paper_bits": rep.bits.paper_bits,
       "distributed": bool(inits) or dist.is_initialized(), "backend": inits[0] if inits else None,
       "world_size": dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))}
if dev.type == "cuda":
    res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
with open(f"{spec['result']}.rank{rank}", "w") as f:
    json.dump(res, f)
'''


# ----------------------------------------------------------------------------------------------- checkpoint
def hub_config(dims: dict, layers: int, vocab: int, max_pos: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=dims["hidden"], intermediate_size=8 * dims["inter"],
        moe_intermediate_size=dims["inter"], num_hidden_layers=layers, num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"], num_experts=dims["experts"],
        num_experts_per_tok=dims["topk"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, dtype="bfloat16")


def layer_shapes(dims: dict, i: int) -> dict[str, tuple]:
    """Hub keys and shapes of decoder layer ``i`` (Qwen3-MoE's original per-expert layout)."""
    h, q, kv, d, e, w = (dims["hidden"], dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"],
                         dims["head_dim"], dims["experts"], dims["inter"])
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
           p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
           p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
           p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,), p + "mlp.gate.weight": (e, h)}
    for x in range(e):
        out.update({f"{p}mlp.experts.{x}.gate_proj.weight": (w, h), f"{p}mlp.experts.{x}.up_proj.weight": (w, h),
                    f"{p}mlp.experts.{x}.down_proj.weight": (h, w)})
    return out


def outer_shapes(dims: dict, vocab: int) -> dict[str, tuple]:
    h = dims["hidden"]
    return {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}


def make_tensor(name: str, shape: tuple, seed: int, std: float = 0.02):
    """Deterministic per name: norms are ones, matrices normal(0, std) from a generator seeded by the name."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_index(d: Path, cfg, weight_map: dict[str, str], total: int) -> None:
    cfg.save_pretrained(d)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_checkpoint(d: Path, dims: dict, layers: int, vocab: int, max_pos: int, seed: int = 0,
                     log=print) -> Path:
    """Write the random checkpoint (one shard per decoder layer + one for the rest) into ``d``; reuse it when
    ``scale_spec.json`` says it was completed with the same spec and at least ``layers`` layers."""
    from safetensors.torch import save_file

    spec = {"dims": dims, "vocab": vocab, "max_pos": max_pos, "seed": seed, "dtype": "bfloat16", "version": 1}
    old = json.loads((d / SPEC_NAME).read_text()) if (d / SPEC_NAME).is_file() else None
    if old is not None and old.pop("layers") >= layers and old == spec:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n = layers + 1
    weight_map, total, t = {}, 0, time.perf_counter()
    groups = [(shard_name(1, n), outer_shapes(dims, vocab))]
    groups += [(shard_name(i + 2, n), layer_shapes(dims, i)) for i in range(layers)]
    for k, (shard, shapes) in enumerate(groups):
        tensors = {name: make_tensor(name, shape, seed) for name, shape in shapes.items()}
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
        total += sum(x.numel() * x.element_size() for x in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
        if k:
            log(f"  built layer {k - 1} ({time.perf_counter() - t:.0f} s, {total / 2**30:.2f} GiB so far)")
    write_index(d, hub_config(dims, layers, vocab, max_pos), weight_map, total)
    (d / SPEC_NAME).write_text(json.dumps({**spec, "layers": layers}, indent=1) + "\n")
    return d


def depth_view(full: Path, depth: int) -> Path:
    """A checkpoint directory of the first ``depth`` layers of ``full`` (symlinked shards)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(full)
    if depth == cfg.num_hidden_layers:
        return full
    if depth > cfg.num_hidden_layers:
        raise ValueError(f"{full} has {cfg.num_hidden_layers} layers, not {depth}")
    view = full.parent / f"{full.name}-view{depth}"
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: s for k, s in index.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < depth}
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    total = 0
    for s in sorted(set(keep.values())):
        (view / s).symlink_to(full / s)
        total += (full / s).stat().st_size
    cfg.num_hidden_layers = depth
    write_index(view, cfg, keep, total)
    return view


# ----------------------------------------------------------------------------------------------- measurement
def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def measure(args, src: Path, method: str, layers: int, workers: int = 1) -> dict:
    """One quantization in fresh process(es); the rank-0 result, with the peak RSS of the biggest rank."""
    work = Path(args.workdir)
    out = work / f"out-{method}-d{layers}-w{workers}"
    res_path = work / f"result-{method}-d{layers}-w{workers}.json"
    shutil.rmtree(out, ignore_errors=True)  # never resume a previous run
    for old in work.glob(res_path.name + ".rank*"):
        old.unlink()
    child = work / "scale_child.py"
    child.write_text(CHILD)
    spec = {"src": str(src), "out": str(out), "result": str(res_path), "method": method, "device": args.device,
            "dtype": args.dtype, "threads": args.threads, "vocab": args.vocab, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "batch_size": args.batch_size}
    launcher = [sys.executable] if workers == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"]
    cmd = launcher + [str(child), json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(res_path.name + ".rank*"))]
    row = {"method": method, "layers": layers, "workers": workers, "wall_seconds": round(wall, 2)}
    if proc.returncode != 0 or not ranks:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {**row, "error": f"exit status {proc.returncode}: " + "\n".join(tail)}
    r = next(x for x in ranks if x["rank"] == 0)
    row.update(seconds=round(r["seconds"], 2), seconds_per_layer=round(r["seconds"] / layers, 3),
               layer_seconds=[round(x, 2) for x in r["layer_seconds"]],
               peak_rss_gb=round(max(x["peak_rss_gb"] for x in ranks), 3),
               calibration_tokens=r["calibration_tokens"], paper_bits=round(r["paper_bits"], 4),
               distributed=r["distributed"], world_size=r["world_size"])
    if r["glas_forward_s"] or r["glas_backward_s"]:
        glas = r["glas_forward_s"] + r["glas_backward_s"]
        row.update(glas_seconds=round(glas, 2), glas_forward_seconds=round(r["glas_forward_s"], 2),
                   glas_share=round(glas / r["seconds"], 3))
    if "peak_gpu_gb" in r:
        row["peak_gpu_gb"] = round(max(x.get("peak_gpu_gb", 0.0) for x in ranks), 3)
    if workers > 1:
        row["peak_rss_gb_per_rank"] = [round(x["peak_rss_gb"], 3) for x in ranks]  # the host holds their sum
        row["backend"] = r["backend"]
        if not r["distributed"]:
            row["error"] = "the ranks ran without torch.distributed (each quantized the whole model)"
    return row


def projection(seconds_per_layer: float, tokens: int, target_tokens: int = TARGET_TOKENS,
               target_layers: int = TARGET_LAYERS) -> float:
    """Minutes for ``target_layers`` layers at ``target_tokens`` calibration tokens, linear in tokens."""
    return seconds_per_layer * target_tokens / tokens * target_layers / 60


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def summarize(args, device: str, runs: dict, depth_rows: dict, worker_rows: dict, command: str) -> dict:
    tokens = args.nsamples * args.seqlen
    ok = {m: r for m, r in runs.items() if "error" not in r}
    spl = {m: r["seconds_per_layer"] for m, r in ok.items()}
    res = {"device": device, "command": command, "layers_measured": args.layers, "calibration_tokens": tokens,
           "calibration": f"{args.nsamples} x {args.seqlen} random token ids in [3, {args.vocab}), seed 0",
           "model": ("qwen3_moe, random bf16 weights: hidden {hidden}, {experts} experts x {inter}, top-{topk}, "
                     "{heads} query / {kv_heads} KV heads x {head_dim}").format(**args.dims) + f", vocab {args.vocab}",
           **({"note": args.note} if args.note else {}), "threads_per_process": args.threads, "dtype": args.dtype,
           "seconds_per_layer": spl,
           "projection": f"linear: seconds_per_layer x {TARGET_TOKENS} / {tokens} tokens x {TARGET_LAYERS} layers",
           "projected_minutes_48_layers_by_method": {m: round(projection(s, tokens), 1) for m, s in spl.items()}}
    # MoBiE's first MoE layer is its probe (every layout fit, then the refit) and later layers fit one layout:
    # with 2+ layers measured, the first layer once plus the mean of the others for the remaining 47
    aware = {m: round((r["layer_seconds"][0] + (TARGET_LAYERS - 1) * statistics.fmean(r["layer_seconds"][1:]))
                      * TARGET_TOKENS / tokens / 60, 1)
             for m, r in ok.items() if len(r.get("layer_seconds") or []) >= 2}
    if aware:
        res["projected_minutes_48_layers_probe_aware_by_method"] = aware
        if "mobie" in aware and "billm" in aware:
            res["mobie_vs_billm_probe_aware"] = round(aware["mobie"] / aware["billm"], 3)
    proj = res["projected_minutes_48_layers_by_method"]
    res["projected_minutes_48_layers"] = proj.get("mobie")
    res["billm_projected_minutes_48_layers"] = proj.get("billm")
    if proj.get("mobie") and proj.get("billm"):
        res["mobie_vs_billm_projected"] = round(proj["mobie"] / proj["billm"], 3)
    res["peak_rss_gb"] = ok.get("mobie", {}).get("peak_rss_gb")
    res["peak_rss_gb_by_method"] = {m: r["peak_rss_gb"] for m, r in ok.items()}
    if any("peak_gpu_gb" in r for r in ok.values()):
        res["peak_gpu_gb_by_method"] = {m: r.get("peak_gpu_gb") for m, r in ok.items()}
    res["glas_share"] = ok.get("mobie", {}).get("glas_share")
    res["peak_rss_gb_by_depth"] = {str(d): r.get("peak_rss_gb") for d, r in sorted(depth_rows.items())}
    by_depth = {d: r["peak_rss_gb"] for d, r in depth_rows.items() if "error" not in r}
    if len(by_depth) >= 2:
        lo, hi = min(by_depth), max(by_depth)
        res["rss_growth_2_to_8"] = round(by_depth[hi] / by_depth[lo], 3)
        res["rss_growth_depths"] = [lo, hi]
    res["workers_seconds"] = {str(n): r.get("seconds") for n, r in sorted(worker_rows.items())}
    t1, t2 = worker_rows.get(1, {}), worker_rows.get(2, {})
    res["workers_speedup_2"] = (round(t1["seconds"] / t2["seconds"], 3)
                                if "seconds" in t1 and "seconds" in t2 and "error" not in t2 else None)
    errors = {f"workers_{n}": r["error"] for n, r in worker_rows.items() if "error" in r}
    errors.update({f"method_{m}": r["error"] for m, r in runs.items() if "error" in r})
    errors.update({f"depth_{d}": r["error"] for d, r in depth_rows.items() if "error" in r})
    if errors:
        res["errors"] = errors
    res["runs"] = {"methods": runs, "depths": {str(d): r for d, r in depth_rows.items()},
                   "workers": {str(n): r for n, r in worker_rows.items()}}
    return res


def fmt(v, nd=2) -> str:
    return "" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(res: dict) -> str:
    about = (f"Device: {res['device']}; model: {res['model']}; calibration: {res['calibration']}; "
             f"{res['threads_per_process']} thread(s) per process; projection: {res['projection']}.")
    head = ("| method | layers | s total | s / layer | s per layer (sequential pass) | GLAS share | peak RSS GB | "
            "peak GPU GB | projected min, 48 layers x 128x2048 tokens |")
    lines = [f"Command: `{res['command']}`", "", about, "", *([res["note"], ""] if "note" in res else []), head,
             "|" + "---|" * 9]
    for m, r in res["runs"]["methods"].items():
        if "error" in r:
            lines.append(f"| {m} | {r['layers']} | error: {r['error'].splitlines()[-1][:120]} |" + " |" * 6)
            continue
        lines.append(f"| {m} | {r['layers']} | {fmt(r['seconds'], 1)} | {fmt(r['seconds_per_layer'])} | "
                     f"{', '.join(fmt(x) for x in r['layer_seconds'])} | {fmt(r.get('glas_share'), 3)} | "
                     f"{fmt(r['peak_rss_gb'])} | {fmt(r.get('peak_gpu_gb'))} | "
                     f"{fmt(res['projected_minutes_48_layers_by_method'].get(m), 1)} |")
    lines += ["", f"MoBiE / BiLLM projected time: {fmt(res.get('mobie_vs_billm_projected'), 3)}; counting MoBiE's probe "
              f"layer once (first layer + 47 x the later layers' mean): "
              f"{fmt(res.get('mobie_vs_billm_probe_aware'), 3)} "
              f"({res.get('projected_minutes_48_layers_probe_aware_by_method', {})} min)", "",
              "| MoBiE depth | peak RSS GB | s total |", "|---|---|---|"]
    for d, r in res["runs"]["depths"].items():
        lines.append(f"| {d} | {fmt(r.get('peak_rss_gb'))} | {fmt(r.get('seconds'), 1)}"
                     f"{' (error)' if 'error' in r else ''} |")
    lines += ["", f"Peak RSS growth from the shallowest to the deepest: {fmt(res.get('rss_growth_2_to_8'), 3)}", "",
              "| MoBiE workers | s total | peak RSS GB (largest rank) | note |", "|---|---|---|---|"]
    for n, r in res["runs"]["workers"].items():
        note = r["error"].splitlines()[-1][:160].replace("|", "/") if "error" in r else ""
        lines.append(f"| {n} | {fmt(r.get('seconds'), 1)} | {fmt(r.get('peak_rss_gb'))} | {note} |")
    lines += ["", f"Speedup with 2 workers: {fmt(res.get('workers_speedup_2'), 3)}"]
    return "\n".join(lines) + "\n"


def workers_missing() -> str | None:
    if not any((ROOT / "torchao_mobie" / p).is_file() for p in ("workers.py", "pipeline/workers.py")):
        return ("no torchao_mobie.workers: torch.distributed workers are not supported yet (not launched: every "
                "rank would quantize the whole model into the same directory)")
    return None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy width (hidden 64, 32 experts x 32), depths 2 3, "
                    "4 x 32 tokens, results named scale_tiny; explicit options still win")
    for k, v in REAL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v} (tiny: {TINY[k]})")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="depth of the per-method runs (default 4; tiny 2)")
    ap.add_argument("--depths", type=int, nargs="*", default=None, help="MoBiE depths for peak RSS (default 2 4 8)")
    ap.add_argument("--methods", nargs="*", default=["mobie", "billm", "arb-x"])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="MoBiE process counts (default 1 2)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 8; tiny 4)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 256; tiny 32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (streaming on CUDA needs its device argument)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "torchao_mobie" / "scale",
                    help="checkpoint and scratch outputs (the checkpoint is reused while its spec matches)")
    ap.add_argument("--name", default=None, help="results stem (default scale_<device>; tiny: scale_tiny)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite <name>.json/.md from its stored runs")
    ap.add_argument("--note", default=None, help="free text stored with the results (e.g. the machine's load)")
    args = ap.parse_args(argv)
    base = TINY if args.tiny else {**REAL, "layers": 4, "depths": [2, 4, 8], "nsamples": 8, "seqlen": 256}
    args.dims = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in REAL}
    for k in ("layers", "depths", "nsamples", "seqlen"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    if args.tiny and args.name is None:
        args.name = TINY["name"]
    return args


def write(results: Path, name: str, res: dict) -> None:
    (results / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (results / f"{name}.md").write_text(markdown(res))


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = device_name(args.device)
    name = args.name or f"scale_{device}"
    tag = "-".join(f"{k}{v}" for k, v in args.dims.items()) + f"-v{args.vocab}"
    if args.report_only:  # the summary again, from the runs stored in <name>.json (no measurement)
        old = json.loads((args.results / f"{name}.json").read_text())
        res = summarize(args, device, old["runs"]["methods"],
                        {int(d): r for d, r in old["runs"]["depths"].items()},
                        {int(n): r for n, r in old["runs"]["workers"].items()}, old["command"])
        write(args.results, name, res)
        print(markdown(res))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    depth = max([args.layers, *args.depths])
    t = time.perf_counter()
    print(f"checkpoint: {depth} layers at {args.dims} under {args.workdir}", flush=True)
    full = build_checkpoint(args.workdir / f"ckpt-{tag}", args.dims, depth, args.vocab,
                            max(40960, args.seqlen))
    print(f"checkpoint ready ({time.perf_counter() - t:.0f} s): {full}", flush=True)
    runs, depth_rows, worker_rows = {}, {}, {}
    args.results.mkdir(parents=True, exist_ok=True)

    def save():
        res = summarize(args, device, runs, depth_rows, worker_rows, command)
        write(args.results, name, res)
        return res

    def run(method, layers, workers=1):
        row = measure(args, depth_view(full, layers), method, layers, workers)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if "error" in row:
            print(f"  error: {row['error']}", flush=True)
        return row

    for m in args.methods:
        runs[m] = run(m, args.layers)
        save()
    for d in args.depths:
        depth_rows[d] = runs["mobie"] if d == args.layers and "mobie" in runs else run("mobie", d)
        save()
    for n in args.workers:
        if n == 1 and "mobie" in runs:
            worker_rows[n] = runs["mobie"]  # one worker: the plain single-process run
        elif n > 1 and workers_missing():
            worker_rows[n] = {"method": "mobie", "layers": args.layers, "workers": n, "error": workers_missing()}
            print(f"workers {n}: {workers_missing()}", flush=True)
        else:
            worker_rows[n] = run("mobie", args.layers, n)
        save()
    res = save()
    print(markdown(res))
    print(f"wrote {args.results / name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
