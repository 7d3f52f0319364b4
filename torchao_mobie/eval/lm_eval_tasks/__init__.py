"""lm-eval task configs (``*.yaml``) that run offline on local WikiText-2 / PTB; see README.md here.

Point lm-eval at this folder (``TaskManager(include_path=TASK_DIR)`` or ``lm_eval --include_path``), or use
:func:`torchao_mobie.integrations.lm_eval.evaluate_lm_eval`, which does so.
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
