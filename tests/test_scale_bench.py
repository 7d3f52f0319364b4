"""benchmarks/scale.py: the random checkpoint is a loadable hub checkpoint (and so is each depth view), built
deterministically and reused; the projection is linear in tokens and layers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402

DIMS = {"hidden": 32, "experts": 4, "inter": 16, "topk": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}


def test_checkpoint_loads_and_views(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    d = scale.build_checkpoint(tmp_path / "ckpt", DIMS, 3, 64, 128, log=lambda *_: None)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 4  # the non-layer shard and one per decoder layer
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in index  # hub layout: per-expert keys
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 3 and model.config.num_experts_per_tok == 2
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    with safe_open(str(d / index["model.layers.1.mlp.experts.0.gate_proj.weight"]), framework="pt") as f:
        ref = f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert ref.dtype == torch.bfloat16 and 0.015 < ref.float().std() < 0.025
    assert torch.equal(gate_up[0, :16].to(torch.bfloat16), ref)
    assert torch.equal(ref, scale.make_tensor("model.layers.1.mlp.experts.0.gate_proj.weight", (16, 32), 0))

    view = scale.depth_view(d, 2)
    short, info = AutoModelForCausalLM.from_pretrained(view, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and short.config.num_hidden_layers == 2
    assert torch.equal(short.model.layers[1].mlp.experts.gate_up_proj, gate_up)

    mtime = (d / scale.SPEC_NAME).stat().st_mtime_ns
    assert scale.build_checkpoint(d, DIMS, 2, 64, 128) == d  # deep enough: reused, not rebuilt
    assert (d / scale.SPEC_NAME).stat().st_mtime_ns == mtime


def test_projection_is_linear():
    assert scale.projection(10.0, 2048) == pytest.approx(10.0 * 128 * 48 / 60)
    assert scale.projection(10.0, 4096) == pytest.approx(scale.projection(5.0, 2048))


def test_tiny_defaults_do_not_touch_real_results():
    args = scale.parse_args(["--tiny", "--experts", "8"])
    assert args.name == "scale_tiny" and args.dims["experts"] == 8 and args.dims["hidden"] == 64
    real = scale.parse_args([])
    assert real.name is None and real.dims == scale.REAL and real.depths == [2, 4, 8]


def test_probe_aware_projection_counts_the_first_layer_once():
    from types import SimpleNamespace

    args = SimpleNamespace(nsamples=8, seqlen=128, layers=2, vocab=512, note=None, threads=1, dtype="float32",
                           dims=dict(scale.REAL))
    runs = {"mobie": {"seconds_per_layer": 295.0, "layer_seconds": [450.0, 140.0], "peak_rss_gb": 4.0},
            "billm": {"seconds_per_layer": 130.0, "layer_seconds": [130.0, 130.0], "peak_rss_gb": 2.0}}
    res = scale.summarize(args, "cpu-test", runs, {}, {}, "cmd")
    per_min = scale.TARGET_TOKENS / 1024 / 60
    assert res["projected_minutes_48_layers_probe_aware_by_method"]["mobie"] == pytest.approx(
        (450 + 47 * 140) * per_min, abs=0.1)
    assert res["mobie_vs_billm_probe_aware"] == pytest.approx((450 + 47 * 140) / (48 * 130), abs=1e-3)
    assert res["mobie_vs_billm_projected"] == pytest.approx(295 / 130, abs=1e-3)  # the plain linear one stays
