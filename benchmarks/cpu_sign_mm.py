"""The C++ CPU sign products (``torchao_mobie/kernels/csrc/sign_mm.cpp``) alone, at Qwen3-30B-A3B's expert shapes.

Usage::

    python benchmarks/cpu_sign_mm.py                      # this checkout's kernels
    python benchmarks/cpu_sign_mm.py --against 3e1f6b9    # and the kernels of another revision, same run

Times the four products of one MoE layer (128 experts; gate_up [1536, 2048] and down [2048, 768] main planes,
their salient planes of 470 and 744 slots as in ``benchmarks/cpu_decode.py``) on random sign words:
- cold decode: 8 rows, 8 random experts per call, a new set each call (the weights come from memory);
- warm decode: 8 rows, the same 8 experts every call (the weights stay in cache);
- prefill: 1024 rows over random experts (8 per expert on average).
Each source is built under its own op namespace (``torch.utils.cpp_extension.load``), and the results are
checked against unpacked signs. Writes ``benchmarks/results/cpu_sign_mm.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from torchao_mobie.kernels.packing import unpack_signs

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "torchao_mobie" / "kernels" / "csrc" / "sign_mm.cpp"
RESULTS = ROOT / "benchmarks" / "results"
E, HIDDEN, INTER, SAL = 128, 2048, 768, {"gate_up": 470, "down": 744}


def build(text: str, label: str):
    """The ops of one source, loaded under a namespace of their own."""
    from torch.utils import cpp_extension

    ns = f"mobie_cpu_{label}_{hashlib.md5(text.encode()).hexdigest()[:8]}"
    path = Path(tempfile.mkdtemp()) / f"{ns}.cpp"
    path.write_text(text.replace("mobie_cpu", ns))
    cpp_extension.load(name=ns, sources=[str(path)], is_python_module=False,
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return getattr(torch.ops, ns)


def problem(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32, generator=g)

    return {"gate_up": (words(E, 2 * INTER, HIDDEN // 32), words(E, SAL["gate_up"], 2 * INTER // 32), HIDDEN, 2 * INTER),
            "down": (words(E, HIDDEN, INTER // 32), words(E, SAL["down"], HIDDEN // 32), INTER, HIDDEN), "g": g}


def calls(op, prob: dict, rows: int, ids: torch.Tensor) -> dict:
    g = prob["g"]
    out = {}
    for name in ("gate_up", "down"):
        w, w2, n, m = prob[name]
        x, v = torch.randn(rows, n, generator=g), torch.randn(rows, w2.shape[1], generator=g)
        out[name] = lambda i=None, x=x, w=w: op.sign_mm(x, w, ids if i is None else i)
        out[f"salient_{name}"] = lambda i=None, v=v, w2=w2, m=m: op.sign_mm_t(v, w2, ids if i is None else i, m)
    return out


def timed(f, reps: int, ids_cycle=None) -> float:
    f(None if ids_cycle is None else ids_cycle[0])
    ts = []
    for r in range(reps):
        i = None if ids_cycle is None else ids_cycle[(r + 1) % len(ids_cycle)]
        t = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def measure(op, prob: dict) -> dict:
    g = prob["g"]
    res = {}
    sets = [torch.randperm(E, generator=g)[:8].sort().values for _ in range(64)]
    for name, f in calls(op, prob, 8, sets[0]).items():
        res.setdefault("cold_decode_ms", {})[name] = round(timed(f, 200, sets), 4)
        res.setdefault("warm_decode_ms", {})[name] = round(timed(f, 200), 4)
    ids = torch.randint(0, E, (1024,), generator=g).sort().values
    for name, f in calls(op, prob, 1024, ids).items():
        res.setdefault("prefill_1024_ms", {})[name] = round(timed(f, 5), 3)
    for k in list(res):
        res[k]["total"] = round(sum(res[k].values()), 4)
    w, w2, n, m = prob["gate_up"]  # correctness on unpacked signs
    x, v = torch.randn(8, n, generator=g), torch.randn(8, w2.shape[1], generator=g)
    ref = torch.einsum("sk,smk->sm", x, unpack_signs(w[sets[0]], n))
    ref2 = torch.einsum("st,stm->sm", v, unpack_signs(w2[sets[0]], m))
    res["max_abs_err"] = max((op.sign_mm(x, w, sets[0]) - ref).abs().max().item(),
                             (op.sign_mm_t(v, w2, sets[0], m) - ref2).abs().max().item())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default=None, metavar="REV", help="also time sign_mm.cpp of this git revision")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="cpu_sign_mm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sources = {"this checkout": SRC.read_text()}
    if args.against:
        sources[args.against] = subprocess.run(["git", "show", f"{args.against}:{SRC.relative_to(ROOT)}"], cwd=ROOT,
                                               check=True, capture_output=True, text=True).stdout
    prob = problem()
    ops = {label: build(text, f"v{i}") for i, (label, text) in enumerate(sources.items())}
    rows = {label: measure(op, prob) for label, op in ops.items()}
    res = {"command": "python benchmarks/cpu_sign_mm.py" + (f" --against {args.against}" if args.against else "")
           + (f" --threads {args.threads}" if args.threads != 1 else ""), "threads": args.threads,
           "shapes": {"experts": E, "hidden": HIDDEN, "moe_intermediate": INTER, "salient_slots": SAL},
           "kernels": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    lines = [f"Command: `{res['command']}` ({args.threads} thread(s); ms per call, medians)", "",
             "| kernels | case | gate_up | down | salient gate_up | salient down | total | max abs err |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        for case in ("cold_decode_ms", "warm_decode_ms", "prefill_1024_ms"):
            c = r[case]
            lines.append(f"| {label} | {case.removesuffix('_ms')} | {c['gate_up']} | {c['down']} | "
                         f"{c['salient_gate_up']} | {c['salient_down']} | {c['total']} | {r['max_abs_err']:.1e} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
