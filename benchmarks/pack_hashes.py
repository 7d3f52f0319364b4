"""sha256 of every packed tensor MoBiEConfig() leaves on each zoo model: a refactor that changes them changed results.

    python benchmarks/pack_hashes.py            # record benchmarks/results/pack_hashes.json
    python benchmarks/pack_hashes.py --check    # recompute and compare; exit 1 on any difference

Each committed zoo model (micro included) is quantized with ``quantize_model(model, MoBiEConfig(), calib)``
on the calibration of ``benchmarks/methods.py`` (32x256 WikiText-2 train tokens, seed 0, float32 model,
``torch.manual_seed(0)`` before quantizing, one thread), and the bytes of every ``MoBiETensor``'s stored
tensors (``stored_tensors()``) are hashed, with their dtype and shape and the tensor's ``side``.
The default picks per-expert factors everywhere on the zoo, so three variants also pin the layouts it
does not keep: a shared backbone on the input side, on the output side (int8), and more full planes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "pack_hashes.json"
# MoBiEConfig fields per variant ("default" = MoBiEConfig())
VARIANTS = {"default": {}, "side=input": {"side": "input"}, "side=output": {"side": "output"},
            "max_bits=3.0": {"max_bits": 3.0}}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, on CPU)."""
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(b.numpy().tobytes()).hexdigest()


def model_hashes(name: str, fields: dict, seed: int = 0, nsamples: int = 32, seqlen: int = 256) -> dict:
    """``{param fqn: {"side": .., "tensors": {name: "dtype [shape] sha256"}}}`` of the zoo model packed by
    ``MoBiEConfig(**fields)``."""
    from torchao_mobie import MoBiEConfig, quantize_model
    from torchao_mobie.data import calibration_set
    from torchao_mobie.storage import MoBiETensor
    from torchao_mobie.zoo import load_zoo_model

    model, tok = load_zoo_model(name)
    calib = calibration_set("wikitext2", tok, nsamples, seqlen, seed)
    torch.manual_seed(seed)
    quantize_model(model, MoBiEConfig(**fields), calib, progress=False)
    out = {}
    for fqn, p in model.named_parameters():
        if isinstance(p, MoBiETensor):
            out[fqn] = {"side": p.side, "tensors": {k: f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} "
                                                        f"{tensor_sha256(t)}"
                                                    for k, t in sorted(p.stored_tensors().items())}}
    if not out:
        raise RuntimeError(f"{name}: MoBiEConfig() left no MoBiETensor parameter (expected packed experts)")
    return out


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two ``model_hashes`` results (empty: identical)."""
    diffs = [f"{k}: missing after" for k in old if k not in new] + [f"{k}: new" for k in new if k not in old]
    for k in old.keys() & new.keys():
        if old[k]["side"] != new[k]["side"]:
            diffs.append(f"{k}: side {old[k]['side']} -> {new[k]['side']}")
        a, b = old[k]["tensors"], new[k]["tensors"]
        for t in sorted(a.keys() | b.keys()):
            if a.get(t) != b.get(t):
                diffs.append(f"{k}.{t}: {a.get(t)} -> {b.get(t)}")
    return sorted(diffs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help=f"compare with {OUT.name}; exit 1 on any difference")
    ap.add_argument("--models", nargs="*", default=None, help="zoo models (default: every committed one)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from torchao_mobie.zoo import available

    models = args.models or available()
    old = json.loads(OUT.read_text()) if OUT.exists() else None
    if args.check:
        if old is None:
            ap.error(f"--check: {OUT} does not exist; record it first (without --check)")
        unknown = [f"{m} {v}" for m in models for v in args.variants if v not in old["models"].get(m, {})]
        if unknown:
            ap.error(f"--check: {OUT.name} has no hashes for {unknown}")
    result, failed, n_runs = {}, False, 0
    for name in models:
        for variant in args.variants:
            t = time.perf_counter()
            got = result.setdefault(name, {})[variant] = model_hashes(name, VARIANTS[variant])
            n = sum(len(v["tensors"]) for v in got.values())
            took = f"{time.perf_counter() - t:.0f}s"
            n_runs += 1
            if args.check:
                diffs = differences(old["models"][name][variant], got)
                failed |= bool(diffs)
                print(f"{name} [{variant}]: {'identical' if not diffs else f'{len(diffs)} DIFFERENCES'} "
                      f"({len(got)} packed weights, {n} tensors, {took})", flush=True)
                for d in diffs[:20]:
                    print("   ", d)
            else:
                print(f"{name} [{variant}]: {len(got)} packed weights, {n} tensors hashed ({took})", flush=True)
    if args.check:
        print("pack_hashes --check:", "DIFFERENT" if failed else
              f"identical hashes on {len(models)} models x {len(args.variants)} configs ({n_runs} runs)")
        return 1 if failed else 0
    keep = {} if old is None else {k: v for k, v in old["models"].items() if k not in result}
    for k, v in result.items():  # variants not rerun keep their hashes
        result[k] = {**(old or {"models": {}})["models"].get(k, {}), **v}
    command = "python benchmarks/pack_hashes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": command.strip(), "torch": torch.__version__,
                               "models": keep | result}, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
