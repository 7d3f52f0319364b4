"""Streaming quantization (issue 18): a sharded hub checkpoint in, one decoder layer in memory at a time, the
packed checkpoint out; bit-identical to ``quantize_model`` on every zoo model, resumable after a crash with
the same bytes, and refusing to resume with other settings."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from torchao_mobie import MoBiEConfig, quantize_model
from torchao_mobie.pipeline.stream_state import MANIFEST, StreamResumeError
from torchao_mobie.pipeline.streaming import FAIL_AFTER_ENV, StreamFault, quantize_streaming
from torchao_mobie.storage import MoBiETensor
from torchao_mobie.zoo import available, load_zoo_model


def _calib(seed=0, n=4, seqlen=32):
    return torch.randint(3, 4000, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Each zoo model saved by save_pretrained with small shards (hub layout: Mixtral's experts as
    block_sparse_moe.experts.N.w1/w2/w3, converted by transformers on load)."""
    root = tmp_path_factory.mktemp("hub")

    def make(name):
        d = root / name
        if not d.exists():
            model, tok = load_zoo_model(name)
            model.save_pretrained(d, max_shard_size="300KB")
            tok.save_pretrained(d)
        return d
    return make


def _digests(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", available())
def test_streaming_equals_in_memory_bit_for_bit(name, sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    src = sharded(name)
    assert len(list(src.glob("model-*.safetensors"))) > 1
    if name.startswith("mixtral"):
        index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in index)  # the hub layout
    calib = _calib()
    model, _ = load_zoo_model(name)
    quantize_model(model, MoBiEConfig(), calib, progress=False)
    out = tmp_path / "out"
    quantize_streaming(src, out, MoBiEConfig(), calib, progress=False)
    assert json.loads((out / MANIFEST).read_text())["complete"] and not (out / ".mobie_stream").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    mine, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert set(mine) == set(theirs)
    n_packed = 0
    for k, p in mine.items():
        q = theirs[k]
        if isinstance(p, MoBiETensor):
            n_packed += 1
            assert isinstance(q, MoBiETensor) and p.side == q.side, k
            a, b = p.stored_tensors(), q.stored_tensors()
            assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a), k
        else:
            assert torch.equal(p.detach(), q.detach()), k
    assert n_packed == 2 * sum(1 for k in mine if k.endswith("experts.down_proj"))


@pytest.mark.parametrize("judge", [False, True])
def test_router_align_streams_bit_for_bit_and_resumes(judge, sharded, tmp_path, monkeypatch):
    """Router alignment: the routers written by the stream equal quantize_model's (with the held-back judge too),
    also after a resume (the full-precision router logits are recomputed layer by layer)."""
    from safetensors.torch import load_file

    src, calib = sharded("micro-qwen3moe"), _calib(2)
    cfg = MoBiEConfig(router_align=True, router_align_judge=judge)
    model, _ = load_zoo_model("micro-qwen3moe")
    fp = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("gate.weight")}
    report = quantize_model(model, cfg, calib, progress=False)
    whole = tmp_path / "whole"
    streamed = quantize_streaming(src, whole, cfg, calib, progress=False)
    assert streamed.router_alignment == report.router_alignment and len(report.router_alignment) >= 2
    written = {}
    for f in whole.glob("model-*.safetensors"):
        written.update({k: v for k, v in load_file(f).items() if k.endswith("gate.weight")})
    assert written.keys() == fp.keys()
    mine = model.state_dict()
    assert all(torch.equal(written[k], mine[k]) for k in fp)
    kept = sum(r.kept for r in report.router_alignment.values())
    assert sum(not torch.equal(written[k], fp[k]) for k in fp) == kept
    if judge:
        return
    assert kept == len(fp) - 1  # all but the first router, which nothing binarized reaches
    out = tmp_path / "resumed"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(StreamFault):
        quantize_streaming(src, out, cfg, calib, progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    quantize_streaming(src, out, cfg, calib, progress=False)
    assert _digests(out) == _digests(whole)


def test_kill_and_resume_writes_the_same_bytes(sharded, tmp_path, monkeypatch):
    src = sharded("qwen3moe-32e")
    calib = _calib(1)
    whole = tmp_path / "whole"
    quantize_streaming(src, whole, MoBiEConfig(), calib, progress=False)
    out = tmp_path / "resumed"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(StreamFault):
        quantize_streaming(src, out, MoBiEConfig(), calib, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["layers_done"] == 2 and not manifest["complete"]
    assert (out / ".mobie_stream" / "hidden-00001.safetensors").exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    calls = []
    import torchao_mobie.pipeline.streaming as streaming

    orig = streaming._run_stage
    monkeypatch.setattr(streaming, "_run_stage", lambda layer, *a, **k: calls.append(layer.index) or orig(layer, *a, **k))
    quantize_streaming(src, out, MoBiEConfig(), calib, progress=False)
    assert set(calls) == {2, 3}  # only the layers after the last one committed
    assert _digests(out) == _digests(whole)


def test_other_settings_refuse_to_resume(sharded, tmp_path, monkeypatch):
    src = sharded("micro-qwen3moe")
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(StreamFault):
        quantize_streaming(src, out, MoBiEConfig(), _calib(), progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    before = _digests(out)
    with pytest.raises(StreamResumeError, match=r"config\.rounds: 2 -> 1"):
        quantize_streaming(src, out, MoBiEConfig(rounds=1), _calib(), progress=False)
    with pytest.raises(StreamResumeError, match="calibration"):
        quantize_streaming(src, out, MoBiEConfig(), _calib(seed=5), progress=False)
    assert _digests(out) == before  # nothing written
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StreamResumeError, match="not empty"):
        quantize_streaming(src, other, MoBiEConfig(), _calib(), progress=False)


def test_cli_stream_resumes_and_reloads(sharded, calib_text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from torchao_mobie.cli import main

    src = sharded("micro-qwen3moe")
    out = tmp_path / "cli-out"
    argv = ["quantize", "--model", str(src), "--method", "mobie", "--calib", str(calib_text_file), "--nsamples", "4",
            "--seqlen", "32", "--out", str(out), "--stream", "--device", "cpu"]
    main(argv)
    first = {k: v for k, v in _digests(out).items() if k != "mobie_quantize.json"}
    main(argv)  # complete: a rerun rewrites the same files
    assert {k: v for k, v in _digests(out).items() if k != "mobie_quantize.json"} == first
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.experts.down_proj, MoBiETensor)
    with pytest.raises(SystemExit):
        main([("8" if a == "4" and argv[i - 1] == "--nsamples" else a) for i, a in enumerate(argv)])
    assert "other settings" in capsys.readouterr().err


def test_cli_streams_by_default_when_the_model_does_not_fit(sharded, calib_text_file, tmp_path, capsys, monkeypatch):
    import argparse

    from torchao_mobie.cli import main
    from torchao_mobie.cli import quantize as Q

    src = sharded("micro-qwen3moe")
    numel, stored = Q._weight_numel(src)
    assert numel > 0 and stored == 4 * numel  # the zoo's fp32 weights, read from the shards' headers
    need = 4 * numel * Q.NEED_FACTOR + Q.NEED_EXTRA_GB * 2**30
    args = argparse.Namespace(model=str(src), dtype="float32", device="cpu")
    monkeypatch.setattr(Q, "_available_bytes", lambda device: int(need) + 1)
    assert Q._stream_by_default(args, src) is False
    monkeypatch.setattr(Q, "_available_bytes", lambda device: int(need) - 1)
    assert Q._stream_by_default(args, src) is True
    out = tmp_path / "auto"
    main(["quantize", "--model", str(src), "--method", "mobie", "--calib", str(calib_text_file), "--nsamples", "4",
          "--seqlen", "32", "--out", str(out), "--device", "cpu"])
    assert "streaming it layer by layer" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["complete"]
    # --no-stream loads it whole whatever the rule says
    main(["quantize", "--model", str(src), "--method", "mobie", "--calib", str(calib_text_file), "--nsamples", "4",
          "--seqlen", "32", "--out", str(tmp_path / "whole"), "--device", "cpu", "--no-stream"])
    assert not (tmp_path / "whole" / MANIFEST).exists()
