"""Workers (issue 18): ``torchrun --nproc-per-node 2`` (gloo) splits each layer's experts over the ranks for
statistics and binarization and writes the same bytes as one process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchao_mobie import MoBiEConfig, quantize_model
from torchao_mobie.algorithms.chunks import CHUNK_ALIGN, expert_chunks
from torchao_mobie.pipeline.streaming import quantize_streaming
from torchao_mobie.zoo import load_zoo_model

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, torch
torch.set_num_threads(1)
from torchao_mobie import MoBiEConfig, quantize_model, workers
mode, src, out = sys.argv[1:4]
workers.init_from_env("cpu")
split = [0]
_map = workers.map_chunks
def counted(fn, chunks):  # binarization steps whose expert chunks were spread over the ranks
    split[0] += len(chunks) > 1
    return _map(fn, chunks)
workers.map_chunks = counted
calib = torch.randint(3, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
if mode == "stream":
    from torchao_mobie.pipeline.streaming import quantize_streaming
    quantize_streaming(src, out, MoBiEConfig(), calib, progress=False)
else:
    from torchao_mobie.zoo import load_zoo_model
    model, _ = load_zoo_model(src)
    quantize_model(model, MoBiEConfig(), calib, progress=False)
    if workers.is_writer():
        torch.save({k: v for k, v in model.state_dict().items()}, out)
print(f"rank {workers.rank()} of {workers.world_size()}: {split[0]} split steps", flush=True)
"""


def _calib():
    return torch.randint(3, 4000, (4, 32), generator=torch.Generator().manual_seed(0))


def _digests(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _torchrun(tmp_path: Path, *args: str, n: int = 2) -> str:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                        str(script), *args], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_chunks_give_every_worker_a_share():
    assert expert_chunks(32, 1, budget=2**30, parts=2) == [slice(0, 16), slice(16, 32)]
    assert expert_chunks(128, 1, budget=2**30, parts=2) == [slice(0, 64), slice(64, 128)]
    # below two aligned chunks there is nothing to split (bit-identity needs 16-aligned chunk starts)
    assert expert_chunks(8, 1, budget=2**30, parts=2) == [slice(0, 8)]
    for E, parts in ((40, 2), (64, 3), (512, 4)):
        chunks = expert_chunks(E, 1, budget=2**30, parts=parts)
        assert chunks[0].start == 0 and chunks[-1].stop == E
        # 16-aligned starts; the largest chunk (a rank's load) is its aligned share of the experts
        units = -(-E // CHUNK_ALIGN)
        assert all(c.start % CHUNK_ALIGN == 0 for c in chunks)
        assert max(c.stop - c.start for c in chunks) <= -(-units // parts) * CHUNK_ALIGN


def test_two_gloo_workers_stream_the_same_bytes_as_one(tmp_path):
    src = tmp_path / "hub"
    model, tok = load_zoo_model("qwen3moe-32e")  # 32 experts: two chunks, one per rank
    model.save_pretrained(src, max_shard_size="300KB")
    tok.save_pretrained(src)
    one = tmp_path / "one"
    quantize_streaming(src, one, MoBiEConfig(), _calib(), progress=False)
    two = tmp_path / "two"
    log = _torchrun(tmp_path, "stream", str(src), str(two))
    for r in (0, 1):  # both ranks took part, and binarization steps were split
        line = next(x for x in log.splitlines() if f"rank {r} of 2:" in x)
        assert int(line.split(": ")[1].split()[0]) > 0, log
    assert _digests(one) == _digests(two)


@pytest.mark.parametrize("name", ["mixtral-8e"])
def test_two_gloo_workers_in_memory_equal_one(name, tmp_path):
    """A coarse model: the statistics are split (4 experts per rank), the binarization is one chunk."""
    model, _ = load_zoo_model(name)
    quantize_model(model, MoBiEConfig(), _calib(), progress=False)
    out = tmp_path / "two.pt"
    _torchrun(tmp_path, "memory", name, str(out))
    theirs = torch.load(out, weights_only=False)
    mine = model.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        if hasattr(v, "stored_tensors"):
            a, b = v.stored_tensors(), theirs[k].stored_tensors()
            assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a), k
        else:
            assert torch.equal(v, theirs[k]), k
