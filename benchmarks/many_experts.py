"""Time and peak memory of ``quantize_model(MoBiEConfig())`` on Qwen3-Next's expert layout at toy width.

    python benchmarks/many_experts.py [--layers 3] [--seqs 8] [--seqlen 32] [--out results/many_experts.json]

transformers' ``Qwen3NextConfig`` expert layout (512 experts of width 512, top-10, shared expert of width
512, linear/full attention 3:1) with hidden 64, random weights, random calibration tokens, one thread.
Before issue 18's expert chunks (algorithms/chunks.py) one such layer grew past 14 GB; the peak host RSS
(``ru_maxrss``) and the wall time per run are recorded here.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def build(layers: int, experts: int = 512, width: int = 512, topk: int = 10, hidden: int = 64, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
                          linear_key_head_dim=16, linear_value_head_dim=16, num_experts=experts,
                          moe_intermediate_size=width, num_experts_per_tok=topk, shared_expert_intermediate_size=width,
                          intermediate_size=128, max_position_embeddings=256,
                          layer_types=[("full_attention" if i % 4 == 3 else "linear_attention") for i in range(layers)])
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from torchao_mobie import MoBiEConfig, quantize_model

    torch.set_num_threads(1)
    model = build(args.layers)
    calib = torch.randint(3, 256, (args.seqs, args.seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    quantize_model(model, MoBiEConfig(), calib, progress=False)
    res = {"layout": "Qwen3-Next experts (512 x 512, top-10), hidden 64", "layers": args.layers,
           "calibration_tokens": args.seqs * args.seqlen, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "threads": 1, "torch": torch.__version__}
    print(json.dumps(res))
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
