"""Quickstart: binarize the experts of a zoo MoE model with MoBiE, data-free and then calibrated.

    python tutorials/01_quickstart.py [zoo-model-name]      (default: micro-qwen3moe, seconds on a CPU)
"""

import copy
import sys

import torch

import torchao_mobie
from torchao_mobie import MoBiEConfig, quantize_model
from torchao_mobie.data import calibration_samples, eval_windows, load_text, tokenize_corpus
from torchao_mobie.eval import compare_models
from torchao_mobie.zoo import load_zoo_model

name = sys.argv[1] if len(sys.argv) > 1 else "micro-qwen3moe"
torch.manual_seed(0)
model, tok = load_zoo_model(name)  # a transformers *ForCausalLM with fused 3D experts
test = eval_windows(tokenize_corpus(load_text("wikitext2", "test"), tok), 128, max_windows=24)

# 1. torchao-style, no calibration data: identity Hessians (a log line says what is lost without data).
data_free = copy.deepcopy(model)
torchao_mobie.quantize_(data_free, MoBiEConfig())
r = compare_models(model, data_free, test)
print(f"data-free : PPL {r.ppl_fp:.2f} -> {r.ppl_q:.2f}  gap {r.gap:.3f}  top-k kept {r.expert_shift.mean_topk_kept:.3f}")

# 2. Calibrated, sequential (GPTQ order): 16 windows of 128 WikiText-2 train tokens.
calib = calibration_samples(tokenize_corpus(load_text("wikitext2", "train")[:2_000_000], tok), 16, 128, seed=0)
calibrated = copy.deepcopy(model)
report = quantize_model(calibrated, MoBiEConfig(), calib, progress=False)
r = compare_models(model, calibrated, test)
print(f"calibrated: PPL {r.ppl_fp:.2f} -> {r.ppl_q:.2f}  gap {r.gap:.3f}  top-k kept {r.expert_shift.mean_topk_kept:.3f}")
print(f"bits per expert weight: {report.bits.paper_bits:.3f} (papers' convention), "
      f"{report.bits.all_inclusive_bits:.3f} (all-inclusive)")
