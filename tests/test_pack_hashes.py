"""benchmarks/pack_hashes.py: recording, then ``--check`` passes on the same code and fails on any changed byte.

The committed hash file is checked by hand (``python benchmarks/pack_hashes.py --check``): float results may
differ on another CPU or torch build, so CI records its own file and checks against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import pack_hashes
finally:
    sys.path.pop(0)


@pytest.fixture
def hashes_file(tmp_path, monkeypatch):
    out = tmp_path / "pack_hashes.json"
    monkeypatch.setattr(pack_hashes, "OUT", out)
    monkeypatch.setattr(pack_hashes, "RESULTS", tmp_path)
    return out


def test_check_passes_on_the_same_code_and_fails_on_a_changed_byte(hashes_file, capsys):
    argv = ["--models", "micro-qwen3moe", "--variants", "default"]
    assert pack_hashes.main(argv) == 0
    recorded = json.loads(hashes_file.read_text())
    weights = recorded["models"]["micro-qwen3moe"]["default"]
    assert len(weights) == 4 and all({"qdata", "row_scale", "col_scale"} <= set(w["tensors"]) for w in weights.values())
    assert pack_hashes.main(["--check", *argv]) == 0
    assert "identical hashes on 1 models" in capsys.readouterr().out
    fqn = sorted(weights)[0]
    digest = weights[fqn]["tensors"]["qdata"]
    weights[fqn]["tensors"]["qdata"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    hashes_file.write_text(json.dumps(recorded))
    assert pack_hashes.main(["--check", *argv]) == 1
    out = capsys.readouterr().out
    assert f"{fqn}.qdata" in out and "DIFFERENT" in out


def test_check_needs_a_recorded_file(hashes_file):
    with pytest.raises(SystemExit):
        pack_hashes.main(["--check", "--models", "micro-qwen3moe", "--variants", "default"])
