"""Reproducible training of the reference zoo (tokenizer + small MoE LMs on WikiText-2 train).

Run by hand, never in CI: ``python -m torchao_mobie.zoo.train --all`` (about 10 minutes a model on
2 CPU cores). Same seed and thread count give the same checkpoint bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ..data import load_text
from .specs import HELDOUT, VOCAB_SIZE, ZOO, ZooSpec

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def train_tokenizer(out_dir: Path, data_dir=None, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the WikiText-2 train split, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = load_text("wikitext2", "train", data_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class _ExpertWeightPerturbation(torch.nn.Module):
    """A training-only parametrization of expert weights: ``w + delta(w.detach())`` in training, ``w`` otherwise
    (the perturbation is not differentiated: the gradient reaches ``w`` unchanged)."""

    def __init__(self, amount: float):
        super().__init__()
        self.amount = amount

    def delta(self, wd: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, w):
        if not self.training:
            return w
        return w + self.delta(w.detach())


class _WeightNoise(_ExpertWeightPerturbation):
    """``w + σ·mean|w|_row·ε`` (``ε ~ N(0, 1)``, fresh each forward; ``σ = amount``)."""

    def delta(self, wd):
        return self.amount * wd.abs().mean(-1, keepdim=True) * torch.randn_like(wd)


class _SignPull(_ExpertWeightPerturbation):
    """``w + λ·(mean|w|_row·sign(w) - w)`` with ``λ ~ U(0, amount)`` drawn each forward: the model learns weights
    whose partly binarized versions work, i.e. that are less fragile under binarization."""

    def delta(self, wd):
        lam = self.amount * torch.rand(())
        return lam * (wd.abs().mean(-1, keepdim=True) * torch.sign(wd) - wd)


def _training_noise(model, spec: ZooSpec):
    """The spec's noise recipes on every experts module (dropout on its output, :class:`_WeightNoise` and
    :class:`_SignPull` on its 3-D weights), for training only; returns the function that takes them off again
    (plain parameters, the trained originals). Registered before the optimizer is built, so it updates the originals."""
    from torch.nn.utils import parametrize

    from ..integrations.transformers import is_experts_module

    experts = [m for m in model.modules() if is_experts_module(m)]
    on_weights = [(f, v) for f, v in ((_WeightNoise, spec.expert_weight_noise), (_SignPull, spec.expert_sign_pull)) if v > 0]
    if (spec.expert_dropout > 0 or on_weights) and not experts:
        raise ValueError(f"{spec.name}: expert_dropout / expert_weight_noise / expert_sign_pull set but the model has "
                         "no experts module")
    hooks, noisy = [], []
    p_drop = spec.expert_dropout
    for mod in experts:
        if p_drop > 0:
            hooks.append(mod.register_forward_hook(
                lambda m, args, out: torch.nn.functional.dropout(out, p_drop, m.training)))
        if on_weights:
            for name, w in list(mod.named_parameters(recurse=False)):
                if w.dim() == 3:
                    for f, v in on_weights:
                        parametrize.register_parametrization(mod, name, f(v))
                    noisy.append((mod, name))
    if on_weights and not noisy:
        raise ValueError(f"{spec.name}: expert_weight_noise / expert_sign_pull set but the experts have no 3-D weights")

    def undo():
        for h in hooks:
            h.remove()
        for mod, name in noisy:
            parametrize.remove_parametrizations(mod, name, leave_parametrized=False)

    return undo


def train_model(spec: ZooSpec, tokenizer, out_dir: Path, data_dir=None, seed: int = 0, log=print,
                ids: torch.Tensor | None = None) -> dict:
    """Train one zoo model on its ``train_corpora`` (train splits, concatenated; or on the token stream
    ``ids``) and save it in bf16."""
    from transformers import AutoModelForCausalLM

    from ..data import tokenize_corpus

    torch.manual_seed(seed)
    if ids is None:
        ids = torch.cat([tokenize_corpus(load_text(c, "train", data_dir), tokenizer) for c in spec.train_corpora])
    cfg = spec.build_config()
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    undo_noise = _training_noise(model, spec)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    curve = []
    t0 = time.time()
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec.steps, spec.lr)
        starts = torch.randint(0, ids.numel() - spec.seqlen - 1, (spec.batch_size,), generator=g)
        x = torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = (out.loss - cfg.router_aux_loss_coef * out.aux_loss).item() if out.aux_loss is not None \
            else out.loss.item()
        if step % 50 == 0 or step == spec.steps - 1:
            curve.append({"step": step, "lm_loss": round(lm_loss, 4), "seconds": round(time.time() - t0, 1)})
            log(f"[{spec.name}] step {step}/{spec.steps} lm_loss {lm_loss:.3f} ({time.time() - t0:.0f}s)")
    undo_noise()
    model.eval()
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"name": spec.name, "model_type": spec.model_type, "style": spec.style, "seed": seed,
            "steps": spec.steps, "batch_size": spec.batch_size, "seqlen": spec.seqlen, "lr": spec.lr, "weight_decay": spec.weight_decay,
            "expert_dropout": spec.expert_dropout, "expert_weight_noise": spec.expert_weight_noise,
            "expert_sign_pull": spec.expert_sign_pull,
            "train_corpora": list(spec.train_corpora), "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - t0, 1),
            "torch_threads": torch.get_num_threads(), "curve": curve}
    (out_dir / "training.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None):
    from .registry import ZOO_DIR, heldout_dir

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help=f"zoo models to train (default with --all: {list(ZOO)})")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--out", type=Path, default=ZOO_DIR)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the spec's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override the spec's step count")
    ap.add_argument("--heldout", action="store_true",
                    help=f"train held-out models {list(HELDOUT)} into $MOBIE_HELDOUT_DIR (not committed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = HELDOUT if args.heldout else ZOO
    names = list(specs) if args.all else args.names
    unknown = [n for n in names if n not in specs]
    if not names or unknown:
        ap.error(f"name {'held-out' if args.heldout else 'zoo'} models to train (known: {list(specs)}); "
                 f"unknown: {unknown}")
    out = heldout_dir() if args.heldout and args.out == ZOO_DIR else args.out
    tok_dir = ZOO_DIR / "_tokenizer" if args.heldout else args.out / "_tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(tok_dir, args.data_dir)
    for n in names:
        spec = specs[n]
        if args.steps is not None:
            import dataclasses

            spec = dataclasses.replace(spec, steps=args.steps)
        train_model(spec, tokenizer, out / n, args.data_dir, spec.seed if args.seed is None else args.seed)


if __name__ == "__main__":
    main()
