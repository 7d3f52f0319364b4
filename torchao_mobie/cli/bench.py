"""``torchao-mobie bench``: memory per component and prefill / decode throughput of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DTYPE_HELP, MODEL_HELP, CLIError, describe, device_of, load_model, max_positions, positive_int, write_json

__all__ = ["add_parser", "cmd_bench"]


def add_parser(sub, common) -> None:
    b = sub.add_parser(
        "bench", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="memory per component and prefill/decode tokens/s",
        description=describe(
            "Memory of the loaded model per component (packed expert signs, scales, backbone, experts that are not "
            "packed, rest of the model) next to its size in bf16, and prefill / decode throughput (random prompt, "
            "greedy decode with a KV cache, median of --iters runs after one warm-up) under torch.inference_mode; on the "
            "CPU the model is torch.compiled first (--no-compile: eager), so packed experts run the fused CPU kernels."),
        epilog="example:\n  torchao-mobie bench --model qwen3moe-32e-mobie --json bench.json --plot memory.png")
    b.add_argument("--model", required=True, help=MODEL_HELP)
    b.add_argument("--prompt-len", type=positive_int, default=128, help="prefill tokens (default 128)")
    b.add_argument("--new-tokens", type=positive_int, default=32, help="decode steps (default 32)")
    b.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step (default 1)")
    b.add_argument("--iters", type=positive_int, default=3, help="timed runs, median reported (default 3)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help=DTYPE_HELP + " (default auto: memory as the checkpoint stores it)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    b.add_argument("--experts-implementation", default=None,
                   help="override the experts implementation (e.g. mobie, grouped_mm, eager)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model before timing (default: on for the CPU, where packed experts then "
                        "run the fused CPU kernels; the first, warm-up run compiles)")
    b.add_argument("--gqa-decode-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="run grouped-query decode steps of sdpa attention on the key/value heads (the mobie_sdpa "
                        "attention; default: on for the CPU, where PyTorch's bf16 flash kernel is slow at one query "
                        "token per head)")
    b.add_argument("--json", default=None, help="write memory and speed figures to this JSON file")
    b.add_argument("--plot", default=None, help="write a PNG bar plot of memory per component vs bf16")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args):
    from ..eval.report import format_table
    from ..eval.speed import compiled_for_bench, throughput
    from ..storage import memory_report

    device = device_of(args.device)
    model, _, _ = load_model(args.model, "--model", args.dtype, device, tokenizer=False)
    if args.experts_implementation:
        try:
            model.set_experts_implementation(args.experts_implementation)
        except Exception as e:
            raise CLIError(f"--experts-implementation {args.experts_implementation}: {e}") from e
    max_pos = max_positions(model)
    if max_pos is not None and args.prompt_len + args.new_tokens > max_pos:
        raise CLIError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's context "
                       f"(config.max_position_embeddings={max_pos})")
    mem = memory_report(model)
    if args.gqa_decode_attention if args.gqa_decode_attention is not None else device.type == "cpu":
        from ..integrations.attention import use_decode_attention

        prev = use_decode_attention(model)
        if prev is not None:
            print(f"attention: {prev} -> {model.config._attn_implementation} (grouped-query decode steps on the "
                  "key/value heads)")
    model, compiled, note = compiled_for_bench(model, device, args.compile)
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
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        from ..eval.plots import plot_memory

        p = plot_memory(mem, args.plot, title=f"{Path(args.model).name}: memory per component",
                        stored_label=f"as loaded ({speed['dtype']})")
        print(f"wrote {p}")
    return results
