"""GPU benchmarks of the fused binary MoE kernels against bf16 transformers experts (``grouped_mm``).

Usage (GPU)::

    python benchmarks/kernels.py                       # layer level + end to end, writes
                                                       # benchmarks/results/kernels_<device>.json
    python benchmarks/kernels.py --skip-e2e            # layer level only (~2 min on an H100)
    python benchmarks/kernels.py --dry-run             # CPU, tiny shapes, every code path (CI)

Layer level (random weights, shapes of Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B (routed experts only: the
shared expert is identical in both and stays outside), Mixtral-8x7B): time of one experts call at
1, 4, 16, 64, 512, 2048 tokens, bf16 ``grouped_mm`` (transformers) vs :func:`fused_moe_binary`, both
captured in CUDA graphs at decode sizes (<= 64 tokens); bytes each call must read (packed bits +
scales of the experts hit, backbones, activations) and the achieved fraction of a measured
device-to-device copy bandwidth; the bandwidth ceiling (bytes / copy bandwidth) is printed per row.
CEJD sides follow ``cejd.choose_side`` (Qwen3: gate_up output-side, down input-side), bf16 backbones.

End to end: a Qwen3-30B-A3B-shaped model built from its config (random weights, 48 layers), bf16 vs
MoBiE experts, both under ``torch.compile`` (decode: static cache + CUDA graphs through
``generate``); decode tokens/s at batch 1 and 16, prefill of 2048 tokens, peak memory; then MoBiE with
attention projections int8 / lm_head int4 weight-only (torchao ``FqnToConfig``). A compile check
(``torch.compile`` of the packed experts vs eager) runs first.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LAYER_SHAPES = {  # name: (hidden, expert intermediate, experts, top_k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
TINY_SHAPES = {"qwen3-tiny": (64, 32, 8, 4), "mixtral-tiny": (96, 48, 4, 2)}
TOKENS = [1, 4, 16, 64, 512, 2048]
TINY_TOKENS = [1, 17]
QWEN3_30B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                 num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN3_TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, *, graph=False, reps=50, warmup=5) -> float:
    """Median seconds per call; ``graph``: replay a CUDA graph of ``fn`` (static inputs)."""
    if device.type != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            for _ in range(3):
                run()
        except Exception as exc:  # a host sync inside fn: time it eagerly and say so
            print(f"  (CUDA graph capture failed, timing eagerly: {type(exc).__name__}: {exc})", flush=True)
            torch.cuda.synchronize()
            run = fn
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 28  # 256M bf16 = 512 MB
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), device, reps=20)
    del a, b
    return 2 * n * 2 / t


def random_mobie(E, m, n, side, device, dtype=torch.bfloat16, backbone_dtype=torch.bfloat16):
    """Random packed MoBiE weight (no calibration: kernel speed does not depend on the values)."""
    from torchao_mobie.storage import MoBiETensor

    g = torch.Generator(device=device).manual_seed(E * m + n)
    nw = (n + 31) // 32
    qdata = torch.randint(-2 ** 31, 2 ** 31 - 1, (E, m, nw), dtype=torch.int32, device=device, generator=g)
    if n % 32:
        qdata[..., -1] &= (1 << (n % 32)) - 1
    rs = (torch.rand(E, m, device=device, generator=g) * 0.5 + 0.75).div(math.sqrt(n)).half()
    cs = (torch.rand(E, n, device=device, generator=g) * 0.5 + 0.75).half()
    bb = None
    if side != "none":
        N = m if side == "output" else n
        bb = (torch.randn(1, N, N, device=device, generator=g) / math.sqrt(N)).to(backbone_dtype)
    return MoBiETensor(qdata, rs, cs, side, dtype, backbone=bb)


def mobie_bytes(w, expert_ids: torch.Tensor, rows: int) -> int:
    """Bytes one call must read for weight ``w``: packed bits + scales of the experts hit, the backbone,
    ``rows`` activation rows of the input (bf16) — the memory-bound lower bound."""
    E, m, n = w.shape
    hit = int(torch.unique(expert_ids).numel())
    per = w.qdata[0].numel() * 4 + (m + n) * 2 + (m * 2 if w.mean is not None else 0)
    bb = 0 if w.backbone is None else w.backbone.numel() * w.backbone.element_size()
    return hit * per + bb + rows * n * 2 + rows * m * 2


def bf16_bytes(E, H, I, expert_ids, T) -> int:
    hit = int(torch.unique(expert_ids).numel())
    return hit * 3 * H * I * 2 + 2 * T * H * 2


def make_bf16_experts(H, I, E, k, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "grouped_mm"
    with torch.device(device):
        ex = Qwen3MoeExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, H ** -0.5)
        ex.down_proj.normal_(0, I ** -0.5)
    return ex


# ------------------------------------------------------------------------------------------------
# layer level
# ------------------------------------------------------------------------------------------------


def layer_benchmarks(device, shapes, tokens, copy_bw, tiny, check_tol):
    from transformers.integrations.moe import grouped_mm_experts_forward

    from torchao_mobie.algorithms.cejd import choose_side
    from torchao_mobie.kernels import fused_moe_binary, moe_binary_dense_reference

    rows = []
    for name, (H, I, E, k) in shapes.items():
        up = random_mobie(E, 2 * I, H, choose_side(2 * I, H), device)
        down = random_mobie(E, H, I, choose_side(H, I), device)
        ex = make_bf16_experts(H, I, E, k, device)
        for T in tokens:
            x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
            logits = torch.randn(T, E, device=device)
            w, idx = torch.softmax(logits, -1).topk(k, -1)
            w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)
            graph = T * k <= 64
            t_mobie = bench(lambda: fused_moe_binary(x, idx, w, up, down), device, graph=graph)
            if T <= 16 or tiny:  # correctness against dequantized weights (fp32)
                ref = moe_binary_dense_reference(x[:4], idx[:4], w[:4], up, down)
                got = fused_moe_binary(x[:4], idx[:4], w[:4], up, down)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                assert err < check_tol, f"{name} T={T}: fused output differs from the reference ({err:.3g})"
            t_bf16 = float("nan")
            if ex is not None:
                t_bf16 = bench(lambda: grouped_mm_experts_forward(ex, x, idx, w), device, graph=graph)
            nb = mobie_bytes(up, idx, T) + mobie_bytes(down, idx, T * k)
            row = dict(model=name, tokens=T, hidden=H, intermediate=I, experts=E, top_k=k, mobie_s=t_mobie,
                       bf16_s=t_bf16, speedup=t_bf16 / t_mobie, mobie_bytes=nb,
                       bf16_bytes=bf16_bytes(E, H, I, idx, T), mobie_ceiling_s=nb / copy_bw,
                       bf16_ceiling_s=bf16_bytes(E, H, I, idx, T) / copy_bw,
                       mobie_bandwidth_fraction=nb / t_mobie / copy_bw, cuda_graph=graph)
            rows.append(row)
            print(f"{name:20s} T={T:5d}  bf16 {t_bf16 * 1e6:9.1f} us  mobie {t_mobie * 1e6:9.1f} us  "
                  f"speedup {row['speedup']:6.2f}x  bytes {nb / 1e6:8.2f} MB  ceiling {row['mobie_ceiling_s'] * 1e6:7.1f} us"
                  f"  (bf16 ceiling {row['bf16_ceiling_s'] * 1e6:7.1f} us)  BW {row['mobie_bandwidth_fraction']:.2f}",
                  flush=True)
        del up, down, ex
        gc.collect()
    return rows


def compile_check(device, tiny):
    """torch.compile of the packed experts call matches eager (decode and prefill paths)."""
    from torchao_mobie.kernels import fused_moe_binary

    H, I, E, k = (64, 32, 8, 2) if tiny else (2048, 768, 128, 8)
    up = random_mobie(E, 2 * I, H, "output", device)
    down = random_mobie(E, H, I, "input", device)
    res = {}
    for T in (1, 40):
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        w, idx = torch.softmax(torch.randn(T, E, device=device), -1).topk(k, -1)

        def f(x, idx, w):
            return fused_moe_binary(x, idx, w, up, down)

        eager = f(x, idx, w)
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        comp = torch.compile(f, fullgraph=True, backend=backend)(x, idx, w)
        err = ((comp.float() - eager.float()).abs().max() / eager.float().abs().max().clamp_min(1e-6)).item()
        res[f"T{T}"] = err
        assert err < 1e-2, f"compile check T={T}: compiled differs from eager ({err:.3g})"
    torch._dynamo.reset()
    print(f"compile check OK {res}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def build_model(device, tiny, layers=None):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**(QWEN3_TINY if tiny else QWEN3_30B))
    if layers:
        cfg.num_hidden_layers = layers
    with torch.device(device):  # random init directly on the device (61 GB bf16 for the real shape)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    model._optimize_model_for_decode = contextlib.nullcontext  # keep grouped_mm for bf16 decode
    model.set_experts_implementation("grouped_mm")
    return model


def to_mobie(model, device):
    """Swap every experts weight for a random packed MoBiE weight (in place, freeing bf16 experts)."""
    from torchao_mobie.algorithms.cejd import choose_side

    for layer in model.model.layers:
        ex = layer.mlp.experts
        for pname in ("gate_up_proj", "down_proj"):
            E, m, n = getattr(ex, pname).shape
            w = random_mobie(E, m, n, choose_side(m, n), device)
            setattr(ex, pname, torch.nn.Parameter(w, requires_grad=False))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.set_experts_implementation("mobie")  # the kernel dispatch runs Triton on CUDA
    return model


def lowbit_attention(model):
    from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    cfg = FqnToConfig({r"re:model\.layers\.\d+\.self_attn\.[qkvo]_proj": Int8WeightOnlyConfig(version=2),
                       "lm_head": Int4WeightOnlyConfig(group_size=128)})
    quantize_(model, cfg, filter_fn=None)
    return model


def e2e(model, device, tiny, label):
    """decode tok/s at batch 1 and 16 (static cache, compiled forward), prefill time, peak memory."""
    res = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n1, n2 = (2, 4) if tiny else (16, 80)
    prompt_len = 8 if tiny else 32
    gen_kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    if device.type == "cuda":
        from transformers import CompileConfig

        gen_kwargs["compile_config"] = CompileConfig(fullgraph=False, mode="reduce-overhead")
    else:
        gen_kwargs["disable_compile"] = True
    vocab = model.config.vocab_size
    for bs in (1, 16):
        ids = torch.randint(3, vocab, (bs, prompt_len), device=device)
        times = {}
        for n in (n1, n2):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen_kwargs)  # warm-up / compile
            _sync(device)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen_kwargs)
            _sync(device)
            times[n] = time.perf_counter() - t
        res[f"decode_tok_s_bs{bs}"] = bs * (n2 - n1) / max(times[n2] - times[n1], 1e-9)
    T = 16 if tiny else 2048
    ids = torch.randint(3, vocab, (1, T), device=device)
    fwd = model.forward if device.type != "cuda" else torch.compile(model.forward)
    with torch.no_grad():
        res["prefill_s"] = bench(lambda: fwd(input_ids=ids, use_cache=False, logits_to_keep=1), device, reps=5,
                                 warmup=2)
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    torch._dynamo.reset()
    print(f"e2e {label}: {res}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: needs TRITON_INTERPRET=1 "
                                                        "for the Triton kernels, else the reference path runs)")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny, no results written")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="end to end: override the 48 layers (faster compile)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device (none found); use --dry-run to exercise the code "
              "paths on CPU at tiny sizes", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print(f"benchmarks/kernels.py needs a CUDA device for real shapes (got {device}); add --tiny",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1) if device.type == "cpu" else None
    torch.manual_seed(0)
    from torchao_mobie.kernels import choose_backend, triton_usable

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    probe = torch.empty(0, device=device)
    print(f"device: {dev_name}; triton kernels: {triton_usable(probe)}; the dispatch runs: {choose_backend(probe)}",
          flush=True)
    copy_bw = copy_bandwidth(device)
    print(f"measured device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s", flush=True)
    result = dict(device=dev_name, copy_bandwidth_Bps=copy_bw, torch=torch.__version__)
    result["compile_check_max_rel_err"] = compile_check(device, args.tiny)
    tol = 5e-2  # bf16 activations vs the fp32 dense reference
    if not args.skip_layer:
        rows = layer_benchmarks(device, TINY_SHAPES if args.tiny else LAYER_SHAPES,
                                TINY_TOKENS if args.tiny else TOKENS, copy_bw, args.tiny, tol)
        result["layer"] = rows
        dec = [r for r in rows if r["tokens"] == (1 if not args.tiny else TINY_TOKENS[0])]
        result["decode_bandwidth_fraction_per_model"] = {r["model"]: r["mobie_bandwidth_fraction"] for r in dec}
        result["decode_bandwidth_fraction"] = dec[0]["mobie_bandwidth_fraction"]  # Qwen3-30B-A3B, 1 token
        result["layer_decode_speedup_bs1"] = {r["model"]: r["speedup"] for r in dec}
    if not args.skip_e2e:
        model = build_model(device, args.tiny, args.layers)
        result["e2e_layers"] = model.config.num_hidden_layers
        base = e2e(model, device, args.tiny, "bf16")
        to_mobie(model, device)
        mob = e2e(model, device, args.tiny, "mobie")
        low = {}
        try:
            lowbit_attention(model)
            low = e2e(model, device, args.tiny, "mobie + int8 attention / int4 lm_head")
        except Exception as exc:  # torchao int4 kernels need specific GPUs/packages: record, don't hide
            low = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"low-bit attention skipped: {low['error']}", flush=True)
        result["e2e"] = {"bf16": base, "mobie": mob, "mobie_lowbit_attention": low}
        result["decode_speedup_bs1"] = mob["decode_tok_s_bs1"] / base["decode_tok_s_bs1"]
        result["decode_speedup_bs16"] = mob["decode_tok_s_bs16"] / base["decode_tok_s_bs16"]
        result["decode_speedup_bs1_lowbit_attention"] = (
            low["decode_tok_s_bs1"] / base["decode_tok_s_bs1"] if "decode_tok_s_bs1" in low else None)
        result["prefill_speedup"] = base["prefill_s"] / mob["prefill_s"]
        del model
        gc.collect()
    if args.dry_run or (args.tiny and args.out is None):
        print("dry run OK (tiny shapes, nothing written)")
        return 0
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"kernels_{dev_name.replace(' ', '_').replace('/', '_')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
