"""Memory of packed MoBiE zoo models: expert weights and whole model, bf16 vs packed.

    python benchmarks/memory.py [--models NAME ...]

For each available zoo model (bf16): binarize every experts projection with MoBiEConfig's storage
settings (data-free: identity Hessians; calibration does not change what is stored), pack it into
MoBiETensor parameters (torchao_mobie.storage.pack_model) and measure the bytes the model really holds.
Checks that the packed bytes equal the all-inclusive bit accounting (BitBudget) plus word padding and
that the packed model's logits match the fake-quant model's. Writes benchmarks/results/memory.json/.md.

Targets: packed experts <= 12% of bf16 on the fine-grained zoo models, <= 14% on the coarse one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchao_mobie.config import MoBiEConfig, QuantContext
from torchao_mobie.storage import binarize_experts_data_free, memory_report, pack_model
from torchao_mobie.zoo import ZOO, available, load_zoo_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = {"fine-grained": 0.12, "coarse": 0.14}  # micro: no target (test model)


def binarize_data_free(model, config: MoBiEConfig) -> tuple[dict, int]:
    """Fake-quant weights written into the model + ``{param fqn: factors}`` and the summed accounted bits."""
    res = binarize_experts_data_free(model, lambda W, H, name, p: config.quantize_experts(
        W, H, context=QuantContext(name=name, projection=p, data_free=True)))
    return {k: r.factors for k, r in res.items()}, sum(r.bits.stored_bits for r in res.values())


def measure(name: str, config: MoBiEConfig, variant: str = "default") -> dict:
    torch.manual_seed(0)
    model, _ = load_zoo_model(name, dtype=torch.bfloat16)
    before = memory_report(model)
    t = time.time()
    factors, accounted_bits = binarize_data_free(model, config)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
    pack_model(model, factors)
    with torch.no_grad():
        out = model(ids).logits.float()
    after = memory_report(model)
    assert after.experts_bytes == after.experts_budget_bytes + after.experts_padding_bytes
    assert after.experts_budget_bytes * 8 == accounted_bits, (after.experts_budget_bytes * 8, accounted_bits)
    spec = ZOO[name]
    return {
        "model": name, "variant": variant, "backbone_dtype": config.backbone_dtype,
        "family": spec.model_type, "style": spec.style,
        "experts_weights": after.experts_weights,
        "experts_bf16_MB": round(before.experts_bytes / 1e6, 4),
        "experts_packed_MB": round(after.experts_bytes / 1e6, 4),
        "experts_ratio": round(after.experts_ratio, 4),
        "experts_bits_per_weight": round(after.experts_bits_per_weight, 4),
        "accounted_bits_per_weight": round(accounted_bits / after.experts_weights, 4),
        "padding_bytes": int(after.experts_padding_bytes),
        "model_bf16_MB": round(before.model_bytes / 1e6, 4),
        "model_packed_MB": round(after.model_bytes / 1e6, 4),
        "model_ratio": round(after.model_bytes / before.model_bytes, 4),
        "target_experts_ratio": TARGET.get(spec.style),
        "meets_target": None if spec.style not in TARGET else after.experts_ratio <= TARGET[spec.style],
        "max_rel_logit_diff_vs_fake_quant_bf16": round((out - ref).abs().max().item() / ref.abs().max().item(), 5),
        "seconds": round(time.time() - t, 1),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models or available()
    cfg = MoBiEConfig()
    # storage is set by backbone_dtype / gate_up_blocks / salient_cols; skip the refinement loops
    cfg = replace(cfg, glas=False, nges=False, rounds=1, **({"refine": 0} if hasattr(cfg, "refine") else {}))
    variants = {"default": cfg, "bf16-backbone": replace(cfg, backbone_dtype="bfloat16")}
    rows = []
    for n in names:
        for v, c in variants.items():
            row = measure(n, c, v)
            print(json.dumps(row))
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    import sys

    meta = {"command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]), "config": {k: getattr(cfg, k) for k in ("backbone_dtype", "gate_up_blocks", "salient_cols")
                       if hasattr(cfg, k)},
            "dtype": "bfloat16", "calibration": "data-free (storage does not depend on it)",
            "torch": torch.__version__}
    (RESULTS / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Packed MoBiE memory (bf16 zoo models)", "",
             f"MoBiEConfig storage settings: {meta['config']}; data-free binarization (memory does not depend on "
             "calibration). `experts packed` = every byte of the MoBiETensor parameters (packed sign words, fp16 "
             "row/column scales, second-plane bits, bitmap, bf16 backbone or int8 backbone + fp16 row scales) = the all-inclusive "
             "BitBudget + 32-bit word padding. Whole model: every parameter and persistent buffer (tied "
             "embeddings once), non-expert weights bf16.", "",
             "Variants: `default` = MoBiEConfig() (backbone_dtype=\"auto\" = int8 backbone with fp16 row scales; "
             "bit cap 1.5 on fine-grained, 2.2 on coarse models); `bf16-backbone` = "
             "MoBiEConfig(backbone_dtype=\"bfloat16\").", "",
             "| model | variant | style | experts bf16 MB | experts packed MB | ratio | bits/weight | target "
             "| model bf16 MB | model packed MB | model ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = ("–" if r["target_experts_ratio"] is None else
                  f"≤{100 * r['target_experts_ratio']:.0f}% {'✓' if r['meets_target'] else '✗'}")
        lines.append(f"| {r['model']} | {r['variant']} | {r['style']} | {r['experts_bf16_MB']:.3f} | "
                     f"{r['experts_packed_MB']:.3f} | {100 * r['experts_ratio']:.1f}% | "
                     f"{r['experts_bits_per_weight']:.3f} | {target} | {r['model_bf16_MB']:.3f} | "
                     f"{r['model_packed_MB']:.3f} | {100 * r['model_ratio']:.1f}% |")
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
