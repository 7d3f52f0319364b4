"""Reproducing the ablation table: MoBiE with each of CEJD / GLAS / NGES switched off.

    python tutorials/04_ablation.py [zoo-model-name]
The full table over the zoo: python benchmarks/methods.py --name ablation --methods mobie mobie-no-cejd ...
"""

import sys
from dataclasses import replace

from torchao_mobie import MoBiEConfig
from torchao_mobie.eval.report import compare_methods, format_table

name = sys.argv[1] if len(sys.argv) > 1 else "micro-qwen3moe"
full = MoBiEConfig()
configs = {"mobie": full, "no-cejd": replace(full, cejd=False), "no-glas": replace(full, glas=False),
           "no-nges": replace(full, nges=False)}
rows = compare_methods(name, configs, nsamples=16, seqlen=128, eval_windows=24, progress=False)
print(format_table(rows, ["method", "all_inclusive_bits", "wikitext2_gap", "wikitext2_topk_kept", "wikitext2_kl"]))
