"""Evaluating: lm-eval tasks on the in-memory model, and the expert-shift report against full precision.

    python tutorials/03_evaluate.py [zoo-model-name] [limit]
"""

import copy
import sys

import torch

from torchao_mobie import BiLLMConfig, MoBiEConfig, quantize_model
from torchao_mobie.data import calibration_samples, eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval import compare_models
from torchao_mobie.integrations.lm_eval import evaluate_lm_eval
from torchao_mobie.zoo import load_zoo_model

name = sys.argv[1] if len(sys.argv) > 1 else "micro-qwen3moe"
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.manual_seed(0)
fp, tok = load_zoo_model(name)
calib = calibration_samples(tokenize_corpus(load_text("wikitext2", "train")[:2_000_000], tok), 16, 128, seed=0)
test = eval_windows(tokenize_corpus(load_text("wikitext2", "test"), tok), 128, max_windows=24)

for label, cfg in {"billm": BiLLMConfig(), "mobie": MoBiEConfig()}.items():
    q = copy.deepcopy(fp)
    quantize_model(q, cfg, calib, progress=False)
    r = compare_models(fp, q, test)
    # Expert shift: per MoE layer, share of the full-precision top-k assignments the quantized model keeps,
    # and share of tokens whose top-1 expert changed. Binarization error reaching a router moves tokens.
    layers = " ".join(f"{k:.3f}" for k in r.expert_shift.topk_kept)
    print(f"{label}: gap {r.gap:.3f}, KL {r.kl:.4f}, top-k kept per layer [{layers}], "
          f"top-1 changed {r.expert_shift.mean_top1_changed:.3f}")
    res = evaluate_lm_eval(q, tok, ["wikitext2_local", "wikitext2_mc_ctx_local"], limit=limit)
    print(f"  lm-eval: word_perplexity {res['wikitext2_local']['word_perplexity']:.1f}, "
          f"mc_ctx acc {res['wikitext2_mc_ctx_local']['acc']:.3f} +- {res['wikitext2_mc_ctx_local']['acc_stderr']:.3f}")
