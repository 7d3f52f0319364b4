"""Faithfulness of our HBLLM: the published code's gap vs ours, same model, same calibration, same Hessians.

Run by hand, never in CI. It needs a checkout of the published code (GitHub ``Yeyke/HBLLM``, not part
of this repository; nothing of it is copied here) and imports its ``bigptq.HBRAGPTQ`` and
``haarbinary.HaarBinarization`` from ``--peer-dir``:

    git clone https://github.com/Yeyke/HBLLM /tmp/hbllm_pub
    python benchmarks/peer_hbllm.py --peer-dir /tmp/hbllm_pub --models heldout-mixtral-9m heldout-qwen3moe-12m \
        --seeds 0 1 2

The published quantizer runs unchanged, expert matrix by expert matrix, with the README's LLaMA setting
(row-hbraq, l2, group_partition row, block 128, damping 0.01; ``groupsize`` = blocksize as its run.py
sets it), on the per-expert Hessians our pipeline collects, so only the binarizer differs. Its CUDA
synchronisation is a no-op on CPU, and its structural search, which needs 50 columns per block, is
capped at the block's width on narrower last blocks (as ours is; otherwise it stops with a torch.topk
error, e.g. on heldout-mixtral-9m's down_proj: 288 = 128 + 128 + 32 columns). Writes benchmarks/results/hbllm_peer.{json,md}.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from torchao_mobie.algorithms.result import BinarizedWeight, BitBudget
from torchao_mobie.baselines import HBLLMConfig
from torchao_mobie.config import BinarizationConfig
from torchao_mobie.eval.report import compare_methods

RESULTS = Path(__file__).resolve().parent / "results"
_PEER = {}


@contextlib.contextmanager
def _quiet():
    """The published code prints per layer; keep the table readable."""
    say = builtins.print
    builtins.print = lambda *a, **k: None
    try:
        yield
    finally:
        builtins.print = say


@dataclass
class PublishedHBLLMConfig(BinarizationConfig):
    """The published HBLLM quantizer on one expert matrix (fake-quant; bits are not reported)."""

    method: str = "row-hbraq"
    group_partition: str = "row"

    def binarize_matrix(self, W, H):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = W.clone()
        quantizer = _PEER["HaarBinarization"](W, groupsize=self.blocksize, method=self.method,
                                              group_partition=self.group_partition)
        gptq = _PEER["HBRAGPTQ"](lin, quantizer, "l2")
        gptq.H = H.clone()
        with _quiet():
            gptq.fasterquant(blocksize=self.blocksize, percdamp=self.percdamp)
        return BinarizedWeight(lin.weight.data.float(), BitBudget(n_weights=W.numel()))


def load_peer(peer_dir: Path):
    if not (peer_dir / "bigptq.py").is_file():
        raise SystemExit(f"error: --peer-dir {peer_dir} holds no bigptq.py (a checkout of github.com/Yeyke/HBLLM)")
    sys.path.insert(0, str(peer_dir))
    torch.cuda.synchronize = lambda *a, **k: None  # the published code syncs after each matrix
    import bigptq
    from haarbinary import HaarBinarization

    search = bigptq.structural_guassian_distribution

    def capped(tmp, H=None, metric="l2", up_lim=30):
        # the published search needs >= up_lim (50) columns per block (torch.topk); narrower last blocks
        # (e.g. in_features 288 = 128 + 128 + 32) get every count 1 .. ncols-1, as ours does
        return search(tmp, H, metric, min(up_lim, tmp.shape[1]))

    bigptq.structural_guassian_distribution = capped
    _PEER.update(HBRAGPTQ=bigptq.HBRAGPTQ, HaarBinarization=HaarBinarization)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-dir", type=Path, required=True, help="checkout of github.com/Yeyke/HBLLM")
    ap.add_argument("--models", nargs="*", default=[], help="held-out or zoo models to run (none: only --append/--merge rows)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--eval-windows", type=int, default=300)
    ap.add_argument("--name", default="hbllm_peer")
    ap.add_argument("--append", action="store_true", help="keep the rows of <name>.json for other models and seeds")
    ap.add_argument("--merge", nargs="*", default=[], metavar="NAME", help="also add the rows of NAME.json (parallel runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_peer(args.peer_dir)
    command = "python benchmarks/peer_hbllm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows, commands, out_json = [], [command], RESULTS / f"{args.name}.json"
    if args.append and out_json.exists():
        old = json.loads(out_json.read_text())
        rows = [r for r in old["rows"] if (r["model"], r["seed"]) not in {(m, sd) for m in args.models for sd in args.seeds}]
        commands = old["commands"] + commands
    for name in args.merge:
        other = json.loads((RESULTS / f"{name}.json").read_text())
        rows, commands = rows + other["rows"], commands + other["commands"]
    for model in args.models:
        for seed in args.seeds:
            rows += compare_methods(model, {"hbllm": HBLLMConfig(), "hbllm-published": PublishedHBLLMConfig()},
                                    eval_windows=args.eval_windows, seed=seed, progress=False)
            print(f"[{model} seed {seed}] done", flush=True)
    lines = [f"Command: `{' ; '.join(commands)}`", "", "WikiText-2 gap = ln(PPL_q) - ln(PPL_fp), 32x256 WikiText-2 calibration "
             "tokens; the same per-expert Hessians feed both binarizers.", "",
             "| model | seeds | ours | published code | ours / published | per-seed ours | per-seed published | "
             "top-k kept ours / published | quant s ours / published |", "|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model and r["method"] == "hbllm"]
        peer = [r for r in rows if r["model"] == model and r["method"] == "hbllm-published"]
        mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        seeds = lambda rs: ", ".join(f"{r['wikitext2_gap']:.4f}" for r in rs)  # noqa: E731
        lines.append(f"| {model} | {len(ours)} | {mean(ours, 'wikitext2_gap'):.4f} | {mean(peer, 'wikitext2_gap'):.4f} | "
                     f"{mean(ours, 'wikitext2_gap') / mean(peer, 'wikitext2_gap'):.3f} | "
                     f"{seeds(ours)} | {seeds(peer)} | "
                     f"{mean(ours, 'wikitext2_topk_kept'):.4f} / {mean(peer, 'wikitext2_topk_kept'):.4f} | "
                     f"{mean(ours, 'quant_seconds'):.1f} / {mean(peer, 'quant_seconds'):.1f} |")
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
