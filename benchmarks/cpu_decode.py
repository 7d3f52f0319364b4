"""CPU decode / prefill speed: packed MoBiE (compiled CPU kernels) vs bf16 ``grouped_mm``, both under torch.compile.

    python benchmarks/cpu_decode.py                     # every zoo model + the real-size stack (~30 min on 2 cores)
    python benchmarks/cpu_decode.py --models mixtral-8e --no-real --rounds 2 --name scratch   # quick look

Per model, two copies with the same non-expert weights (bf16): the bf16 checkpoint with transformers'
``grouped_mm`` experts and the packed MoBiE model (``MoBiETensor`` experts, the ``"mobie"`` experts
implementation, whose CPU path is :mod:`torchao_mobie.kernels.cpu` inside the compiled graph). Both are
``torch.compile``d (inductor, default settings), with the same attention: ``--attention mobie_sdpa`` (default;
:mod:`torchao_mobie.integrations.attention`, grouped-query decode steps on the key/value heads) or transformers'
``sdpa``. For batch 1 and 8: prefill of ``--prompt-len`` random tokens
per sequence, then ``--new-tokens`` greedy decode steps on the KV cache; the variants alternate round by round
(``--rounds`` timed rounds after 2 warm-up rounds that compile), so both see the same load from other jobs.
Each model is built and timed in a fresh process (``--no-process-per-model`` to share one), as it is deployed.
Reported: medians over rounds (prefill time; the median decode step of each round), their minimum, tokens/s
and speedup packed / bf16.

Models:
* every committed zoo model (``torchao_mobie.zoo.available()``), packed by ``quantize_model(model,
  MoBiEConfig(), calib)`` on bf16 weights with ``--calib-samples`` WikiText-2 train windows of 128 tokens;
* a Qwen3-30B-A3B-shaped stack (hidden 2048, 128 experts of width 768, top-8, 32 heads / 4 KV heads of 128,
  ``--real-layers`` MoE layers (default 4, the most the issue's 2-4 allows: the real model has 48, and the
  costs paid once per step whatever the depth, dynamo's guards, the compiled graph's Python wrapper, embedding
  and head, weigh less the more layers share them; ``--real-layers 2`` was the default before), vocab 1024
  so that the head does not hide the layers), random bf16 weights.
  Its packed experts are built directly from random sign words and scale codes in the layout that
  ``MoBiEConfig()`` plans data-free for these shapes (per-expert factors with 8-bit scale codes; gate_up
  one plane + 470 salient columns, down one plane + 744 salient columns): quantizing 2 x 128 experts of
  3.1 M weights would take far longer than the measurement, and speed does not depend on the values.

Bytes per token (batch-1 decode): every weight a step reads once: non-expert weights (one embedding row,
the head, attention, norms, routers, shared experts) plus, per MoE layer, top-k experts' weights (bf16:
2 bytes per weight; packed: the per-expert share of every stored tensor plus shared backbones); KV cache
reads are left out (<= 1 MB at these lengths). Achieved GB/s = those bytes / decode step time, against a
memcpy (``Tensor.copy_`` of 256 MB, bytes copied per second) measured before and after in the same run.

Writes benchmarks/results/<name>.json / .md / .png (default name cpu_decode).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
REAL = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144, vocab_size=1024,
            norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
REAL_SALIENT = {"gate_up_proj": 470, "down_proj": 744}  # MoBiEConfig()'s data-free plan at these shapes
TARGETS = {"decode_speedup_real": 2.0, "prefill_speedup_real": 0.8, "decode_speedup_zoo_min": 1.0}


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------


def memcpy_gbps(mb: int = 256, reps: int = 15) -> dict:
    src = torch.ones(mb * 2 ** 20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    ts = ts[2:]
    nbytes = src.numel() * 4
    return {"median_GBps": round(nbytes / statistics.median(ts) / 1e9, 2), "max_GBps": round(nbytes / min(ts) / 1e9, 2),
            "MB": mb, "convention": "bytes copied / s (each byte is read once and written once)"}


def load_info() -> dict:
    """Other jobs on the machine: load average and the busiest processes (not ours)."""
    info = {"loadavg": list(os.getloadavg()), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:8]
        info["top_processes"] = [" ".join(line.split()[:5])[:120] for line in out
                                 if str(os.getpid()) != line.split()[0]]
    except Exception:  # pragma: no cover - ps missing
        pass
    return info


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def random_packed(E: int, m: int, n: int, salient: int, dtype=torch.bfloat16, g=None):
    """A ``MoBiETensor [E, m, n]`` of random sign words, 8-bit scale codes (decoded scales 2^-7 .. 2^-3) and
    ``salient`` second-plane columns per expert (random bitmap), per-expert factors (no backbone)."""
    from torchao_mobie.storage.mobie_tensor import MoBiETensor
    from torchao_mobie.kernels.packing import pack_signs

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, generator=g)

    def codes(*shape):
        return torch.randint(1, 256, shape, dtype=torch.uint8, generator=g)

    grid = torch.empty(E, 3, 2)
    grid[..., 0], grid[..., 1] = -7.0, 4.0 / 254
    kw = {}
    if salient:
        sal = torch.zeros(E, n, dtype=torch.bool)
        for e in range(E):
            sal[e, torch.randperm(n, generator=g)[:salient]] = True
        kw = dict(salient=pack_signs(torch.where(sal, 1, -1)), qdata2=words(E, salient, (m + 31) // 32),
                  col_scale2=codes(E, salient))
    return MoBiETensor(words(E, m, (n + 31) // 32), codes(E, m), codes(E, n), "none", dtype,
                       scale_grid=grid.half(), **kw)


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "down_proj") and getattr(m.down_proj, "dim", lambda: 0)() == 3]


def real_models(layers: int, seed: int = 0):
    """(bf16 model, packed model) of the real-size stack; the packed copy shares nothing with the bf16 one."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, **REAL)
    torch.manual_seed(seed)
    bf16 = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    bf16.set_experts_implementation("grouped_mm")
    packed = copy.deepcopy(bf16)
    g = torch.Generator().manual_seed(seed)
    for ex in experts_modules(packed):
        for name, s in REAL_SALIENT.items():
            E, m, n = getattr(ex, name).shape
            setattr(ex, name, torch.nn.Parameter(random_packed(E, m, n, s, g=g), requires_grad=False))
        gc.collect()
    packed.set_experts_implementation("mobie")
    return bf16, packed, {"quantization": "random sign words and codes in MoBiEConfig()'s data-free layout",
                          "salient_columns": REAL_SALIENT, "config": {"num_hidden_layers": layers, **REAL}}


def zoo_models(name: str, calib_samples: int, seed: int = 0):
    from torchao_mobie import quantize_model
    from torchao_mobie.data import calibration_set
    from torchao_mobie.mobie import MoBiEConfig
    from torchao_mobie.zoo import load_zoo_model

    bf16, tok = load_zoo_model(name, dtype=torch.bfloat16)
    bf16.set_experts_implementation("grouped_mm")
    packed, _ = load_zoo_model(name, dtype=torch.bfloat16)
    calib = calibration_set("wikitext2", tok, calib_samples, 128, seed=seed)
    t = time.perf_counter()
    report = quantize_model(packed, MoBiEConfig(), calib, progress=False)
    info = {"quantization": f"quantize_model(MoBiEConfig(), {calib_samples} x 128 WikiText-2 train tokens), bf16",
            "quantize_s": round(time.perf_counter() - t, 1)}
    info["bits_per_weight_all_inclusive"] = round(float(report.bits.all_inclusive_bits), 3)
    return bf16, packed, info


def layouts(model) -> list[str]:
    """Distinct packed layouts: ``side/backbone dtype x planes + salient columns``."""
    from torchao_mobie.storage.mobie_tensor import MoBiETensor

    out = set()
    for p in model.parameters():
        if isinstance(p, MoBiETensor):
            bb = "" if p.backbone is None else f"/{str(p.backbone.dtype).replace('torch.', '')}"
            s = 0 if p.col_scale2 is None else p.col_scale2.shape[1]
            out.add(f"{p.side}{bb} x{1 + p.extra_planes}+{s}{'+mean' if p.mean is not None else ''}")
    return sorted(out)


def decode_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads (see the module docstring)."""
    from torchao_mobie.storage.mobie_tensor import MoBiETensor

    cfg = model.config
    k = cfg.num_experts_per_tok
    total, seen = 0, set()
    emb = model.get_input_embeddings().weight
    for ex in experts_modules(model):
        for _, p in ex.named_parameters(recurse=False):
            seen.add(id(p))
            if isinstance(p, MoBiETensor):
                E = p.num_experts
                for t in p.stored_tensors().values():
                    nb = t.numel() * t.element_size()
                    total += nb if t is p.backbone or t is p.backbone_scale else nb * k // E
            else:  # bf16 [E, out, in] weights, per-expert biases
                total += p.numel() * p.element_size() * k // p.shape[0]
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is emb and not cfg.tie_word_embeddings:
            total += p.shape[1] * p.element_size()  # one row
        else:
            total += p.numel() * p.element_size()  # (a tied embedding is read in full by the head)
    return total


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_once(model, ids: torch.Tensor, new_tokens: int) -> dict:
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - t
    cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        out = model(input_ids=tok, cache=cache, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t)
    return {"prefill_s": prefill, "step_s": statistics.median(steps)}


def measure(compiled: dict, vocab: int, batch: int, prompt_len: int, new_tokens: int, rounds: int,
            warmup: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    runs = {k: [] for k in compiled}
    for r in range(warmup + rounds):
        for name, model in compiled.items():
            res = generate_once(model, ids, new_tokens)
            if r >= warmup:
                runs[name].append(res)
    out = {}
    for name, rs in runs.items():
        pre = [x["prefill_s"] for x in rs]
        dec = [x["step_s"] for x in rs]
        p, d = statistics.median(pre), statistics.median(dec)
        out[name] = {"prefill_ms": round(p * 1e3, 2), "prefill_min_ms": round(min(pre) * 1e3, 2),
                     "decode_step_ms": round(d * 1e3, 3), "decode_step_min_ms": round(min(dec) * 1e3, 3),
                     "prefill_tok_s": round(batch * prompt_len / p, 1), "decode_tok_s": round(batch / d, 1),
                     "rounds_prefill_ms": [round(x * 1e3, 1) for x in pre],
                     "rounds_decode_step_ms": [round(x * 1e3, 2) for x in dec]}
    b, q = out["bf16"], out["packed"]
    out["decode_speedup"] = round(b["decode_step_ms"] / q["decode_step_ms"], 3)
    out["prefill_speedup"] = round(b["prefill_ms"] / q["prefill_ms"], 3)
    out["decode_speedup_min_times"] = round(b["decode_step_min_ms"] / q["decode_step_min_ms"], 3)
    out["prefill_speedup_min_times"] = round(b["prefill_min_ms"] / q["prefill_min_ms"], 3)
    return out


@torch.inference_mode()
def compile_diff(model, compiled, vocab: int) -> float:
    """Max |compiled - eager| / max |eager| of the logits on 16 tokens (for the packed model the eager
    forward runs the reference op ``torch.ops.mobie.binary_factor_mm``)."""
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids).logits.float()
    got = compiled(input_ids=ids).logits.float()
    return round(((got - ref).abs().max() / ref.abs().max()).item(), 5)


def run_model(name: str, bf16, packed, info: dict, args) -> dict:
    from torchao_mobie.storage import memory_report

    row = {"model": name, **info, "packed_layouts": layouts(packed),
           "experts_MB": {"bf16": round(memory_report(bf16).experts_bytes / 1e6, 2),
                          "packed": round(memory_report(packed).experts_bytes / 1e6, 2)},
           "decode_bytes_per_token": {"bf16": decode_bytes_per_token(bf16),
                                      "packed": decode_bytes_per_token(packed)}}
    if args.attention == "mobie_sdpa":  # the same attention for both models (integrations.attention)
        from torchao_mobie.integrations.attention import use_decode_attention

        row["attention"] = {k: f"{use_decode_attention(m)} -> {m.config._attn_implementation}"
                            for k, m in (("bf16", bf16), ("packed", packed))}
    else:
        row["attention"] = {k: m.config._attn_implementation for k, m in (("bf16", bf16), ("packed", packed))}
    compiled = {"bf16": torch.compile(bf16), "packed": torch.compile(packed)}
    row["compiled_vs_eager_max_rel_logit_diff"] = {k: compile_diff(m, compiled[k], bf16.config.vocab_size)
                                                   for k, m in (("bf16", bf16), ("packed", packed))}
    t = time.perf_counter()
    for batch in args.batch_sizes:
        row[f"batch{batch}"] = measure(compiled, bf16.config.vocab_size, batch, args.prompt_len, args.new_tokens,
                                       args.rounds)
        print(f"  {name} batch {batch}: decode x{row[f'batch{batch}']['decode_speedup']}, "
              f"prefill x{row[f'batch{batch}']['prefill_speedup']}", flush=True)
    row["measure_s"] = round(time.perf_counter() - t, 1)
    if 1 in args.batch_sizes:
        for v in ("bf16", "packed"):
            step = row["batch1"][v]["decode_step_ms"] / 1e3
            row.setdefault("decode_GBps", {})[v] = round(row["decode_bytes_per_token"][v] / step / 1e9, 2)
    row["peak_rss_GB"] = peak_rss_gb()
    return row


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    out = {}
    real = [r for r in rows if r["model"].startswith("real-")]
    zoo = [r for r in rows if not r["model"].startswith("real-")]
    if real and "batch1" in real[0]:
        out["decode_speedup_real"] = real[0]["batch1"]["decode_speedup"]
        out["prefill_speedup_real"] = real[0]["batch1"]["prefill_speedup"]
    if zoo and all("batch1" in r for r in zoo):
        out["decode_speedup_zoo_min"] = min(r["batch1"]["decode_speedup"] for r in zoo)
        out["decode_speedup_zoo"] = {r["model"]: r["batch1"]["decode_speedup"] for r in zoo}
    out["acceptance"] = {k: (None if k not in out else bool(out[k] >= v)) for k, v in TARGETS.items()}
    out["targets"] = TARGETS
    return out


def write_markdown(path: Path, res: dict) -> None:
    lines = [f"Command: `{res['command']}`", "",
             f"{res['threads']} threads; attention {res.get('attention', 'sdpa')} (both models); "
             f"memcpy {res['memcpy_before']['median_GBps']} / "
             f"{res['memcpy_after']['median_GBps']} GB/s (median, before / after); load average at start "
             f"{[round(x, 2) for x in res['load_start']['loadavg']]} on {res['load_start']['cpus']} CPUs "
             f"(other jobs were running: timings are medians of alternating rounds).", ""]
    s = res["summary"]
    lines += ["| key | value | target | holds |", "|---|---|---|---|"]
    for k, v in TARGETS.items():
        lines.append(f"| `{k}` | {s.get(k)} | >= {v} | {s['acceptance'][k]} |")
    lines += ["", "| model | batch | bf16 decode tok/s | packed decode tok/s | decode x | bf16 prefill tok/s | "
              "packed prefill tok/s | prefill x | decode x (min times) | prefill x (min times) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        for b in res["batch_sizes"]:
            m = r[f"batch{b}"]
            lines.append(f"| {r['model']} | {b} | {m['bf16']['decode_tok_s']} | {m['packed']['decode_tok_s']} | "
                         f"{m['decode_speedup']} | {m['bf16']['prefill_tok_s']} | {m['packed']['prefill_tok_s']} | "
                         f"{m['prefill_speedup']} | {m['decode_speedup_min_times']} | {m['prefill_speedup_min_times']} |")
    lines += ["", "Batch-1 decode: weight bytes per token and achieved bandwidth", "",
              "| model | bf16 MB/token | packed MB/token | bf16 GB/s | packed GB/s | bf16 step ms | packed step ms | "
              "packed layouts | compiled vs eager, bf16 / packed (max rel logit diff) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        if "decode_GBps" not in r:
            continue
        bt, gb, m = r["decode_bytes_per_token"], r["decode_GBps"], r["batch1"]
        lines.append(f"| {r['model']} | {bt['bf16'] / 1e6:.2f} | {bt['packed'] / 1e6:.2f} | {gb['bf16']} | {gb['packed']} | "
                     f"{m['bf16']['decode_step_ms']} | {m['packed']['decode_step_ms']} | {'; '.join(r['packed_layouts'])} | "
                     f"{r['compiled_vs_eager_max_rel_logit_diff']['bf16']} / "
                     f"{r['compiled_vs_eager_max_rel_logit_diff']['packed']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["models"]
    keys = [(f"batch{b}", kind) for b in res["batch_sizes"] for kind in ("decode_speedup", "prefill_speedup")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    w = 0.8 / len(keys)
    for i, (b, kind) in enumerate(keys):
        ax.bar([j + i * w for j in range(len(rows))], [r[b][kind] for r in rows], w,
               label=f"{kind.split('_')[0]} {b.replace('batch', 'batch ')}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(2.0, color="r", lw=0.8, ls="--", label="real-size decode target")
    ax.set_xticks([j + w * (len(keys) - 1) / 2 for j in range(len(rows))], [r["model"] for r in rows], rotation=15)
    ax.set_ylabel("packed MoBiE / bf16 grouped_mm (tokens/s)")
    ax.set_title(f"CPU, torch.compile, {res['threads']} threads (medians of alternating rounds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_job(name: str, args) -> dict:
    """Build, compile and time one model (the real-size stack if ``name`` starts with ``real-``)."""
    torch.set_num_threads(args.threads)
    from torch._dynamo import config as dynamo_config

    dynamo_config.recompile_limit = max(32, dynamo_config.recompile_limit)  # batch 1 / 8, prefill / decode
    print(f"{name}: building ...", flush=True)
    build = (lambda: real_models(args.real_layers)) if name.startswith("real-") else \
        (lambda: zoo_models(name, args.calib_samples))
    bf16, packed, info = build()
    row = run_model(name, bf16, packed, info, args)
    del bf16, packed
    gc.collect()
    torch.compiler.reset()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="zoo models (default: every available one)")
    ap.add_argument("--no-real", action="store_true", help="skip the real-size stack")
    ap.add_argument("--real-layers", type=int, default=4, help="MoE layers of the real-size stack (2-4; default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after 2 warm-up rounds)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--attention", choices=["mobie_sdpa", "sdpa"], default="mobie_sdpa",
                    help="attention of both models: transformers' sdpa, or mobie_sdpa (the same, with grouped-query "
                         "decode steps on the key/value heads; torchao_mobie.integrations.attention)")
    ap.add_argument("--process-per-model", action=argparse.BooleanOptionalAction, default=True,
                    help="time each model in a fresh process, as deployed (default): after other models were "
                         "compiled in the same process, ~0.7 M live Python objects they leave slow the Python side "
                         "of dynamo's guards and wrappers (micro-qwen3moe's packed step 0.30 -> 0.36 ms)")
    ap.add_argument("--name", default="cpu_decode")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchao_mobie.zoo import available

    res = {"command": "python benchmarks/cpu_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "batch_sizes": args.batch_sizes, "rounds": args.rounds, "attention": args.attention, "torch": torch.__version__,
           "load_start": load_info(), "memcpy_before": memcpy_gbps(), "models": []}
    t0 = time.perf_counter()
    names = args.models if args.models is not None else available()
    jobs = list(names) + ([] if args.no_real else [f"real-qwen3-30b-a3b-{args.real_layers}L"])
    res["process_per_model"] = args.process_per_model
    for name in jobs:
        if args.process_per_model:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                res["models"].append(pool.apply(run_job, (name, args)))
        else:
            res["models"].append(run_job(name, args))
    res["memcpy_after"] = memcpy_gbps()
    res["load_end"] = load_info()
    res["peak_rss_GB"] = max([peak_rss_gb()] + [m["peak_rss_GB"] for m in res["models"]])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["summary"] = summarize(res["models"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(RESULTS / f"{args.name}.md", res)
    plot(RESULTS / f"{args.name}.png", res)
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {RESULTS / args.name}.json/.md/.png")
    return res


if __name__ == "__main__":
    main()
