"""Deploying: quantize to real 1-bit storage, save, load, torch.compile, generate.

    python tutorials/02_deploy.py [zoo-model-name]
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from torchao_mobie import MoBiEConfig, quantize_model
from torchao_mobie.data import calibration_samples, load_text, tokenize_corpus
from torchao_mobie.storage import memory_report
from torchao_mobie.zoo import load_zoo_model

name = sys.argv[1] if len(sys.argv) > 1 else "micro-qwen3moe"
torch.manual_seed(0)
model, tok = load_zoo_model(name)
calib = calibration_samples(tokenize_corpus(load_text("wikitext2", "train")[:2_000_000], tok), 16, 128, seed=0)
# experts become MoBiETensor (packed sign bits, fused scales, shared backbone); packed=False: fake-quant
quantize_model(model, MoBiEConfig(), calib, progress=False)
mem = memory_report(model)
print(f"experts: {mem.experts_ratio:.1%} of bf16, whole model {mem.model_ratio:.1%} of bf16")

prompt = tok(" The game began development in", return_tensors="pt")
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)  # packed format through the registered "mobie" HF quantizer
    tok.save_pretrained(d)
    reloaded = AutoModelForCausalLM.from_pretrained(d)  # import torchao_mobie first (done above)
    with torch.no_grad():
        same = torch.equal(model(**prompt).logits, reloaded(**prompt).logits)
    print("reloaded logits identical:", same)

compiled = torch.compile(reloaded)
with torch.no_grad():
    diff = (compiled(**prompt).logits - reloaded(**prompt).logits).abs().max().item()
print(f"torch.compile vs eager max |diff| = {diff:.2e}")
out = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False)
print("generated:", tok.decode(out[0]))
