"""Peak host memory of streaming vs in-memory quantization as the model gets deeper.

    python benchmarks/streaming_memory.py [--depths 2 4 8] [--out results/streaming_memory.json]

A random-weight qwen3_moe model (hidden 128, 64 experts of width 256, top-8; 25 MB of fp32 expert weights
per layer) is saved with ``save_pretrained(max_shard_size="20MB")`` for each depth; then, each in a fresh
process (``ru_maxrss`` is per process), ``quantize_model`` on the loaded model + ``save_pretrained``, and
``quantize_streaming`` from the shards, both with ``MoBiEConfig()`` on 8x64 random calibration tokens,
one thread. Streaming's peak should not grow with depth; the in-memory one grows by a layer per layer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
mode, src, out = sys.argv[1:4]
from torchao_mobie import MoBiEConfig, quantize_model
calib = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
if mode == "stream":
    from torchao_mobie.pipeline.streaming import quantize_streaming
    quantize_streaming(src, out, MoBiEConfig(), calib, progress=False)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(model, MoBiEConfig(), calib, progress=False)
    model.save_pretrained(out)
print(json.dumps({"seconds": round(time.perf_counter() - t, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def build(path: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=128, intermediate_size=256,
                               moe_intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, num_experts=64, num_experts_per_tok=8,
                               norm_topk_prob=True, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path, max_shard_size="20MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            src = Path(tmp) / f"src{depth}"
            build(src, depth)
            for mode in ("memory", "stream"):
                res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(Path(tmp) / f"{mode}{depth}")],
                                     capture_output=True, text=True, check=True)
                row = {"layers": depth, "mode": mode, **json.loads(res.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out is not None:
        args.out.write_text(json.dumps({"model": "qwen3_moe hidden 128, 64 experts x 256, top-8, random weights",
                                        "calibration_tokens": 512, "threads": 1, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
