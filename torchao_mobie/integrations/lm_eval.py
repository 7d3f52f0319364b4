"""lm-evaluation-harness on in-memory (e.g. freshly quantized) models, with offline tasks shipped here.

``evaluate_lm_eval(model, tokenizer, ["wikitext2_local", "wikitext2_mc_local"])`` wraps the model in lm-eval's
``HFLM`` and runs ``lm_eval.simple_evaluate`` with a ``TaskManager`` that also indexes
``torchao_mobie/eval/lm_eval_tasks`` — so the ``*_local`` tasks (read from local files through
:mod:`torchao_mobie.data`'s resolver) and every lm-eval task name (hub datasets, when online) both work.

lm-eval (and its ``accelerate`` dependency) is the optional ``eval`` extra: it is imported only when called.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TASK_DIR", "LOCAL_TASKS", "task_manager", "evaluate_lm_eval", "compact_results"]

TASK_DIR = Path(__file__).resolve().parent.parent / "eval" / "lm_eval_tasks"

# name -> (what it measures, number of evaluation docs); the tests check this against the YAMLs.
LOCAL_TASKS: dict[str, tuple[str, int]] = {
    "wikitext2_local": ("WikiText-2 raw test, rolling perplexity, one doc per article", 62),
    "ptb_local": ("PTB test, rolling perplexity, 50 sentences per doc", 76),
    "wikitext2_mc_local": ("WikiText-2 test, 4-way true-continuation choice (acc, acc_norm)", 1000),
    "ptb_mc_local": ("PTB test, 4-way true-continuation choice (acc, acc_norm)", 1000),
    "wikitext2_mc_ctx_local": ("WikiText-2 test, 4-way true-context choice (acc)", 1000),
    "ptb_mc_ctx_local": ("PTB test, 4-way true-context choice (acc)", 1000),
}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs `accelerate`)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"lm-eval integration needs the optional `eval` extra (lm_eval, accelerate): {e}. "
            "Install with `pip install 'torchao_mobie[eval]'` or `pip install lm_eval accelerate`.") from e


def task_manager(data_dir: str | Path | None = None, include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that knows our local tasks (and lm-eval's own when ``include_defaults``).

    ``data_dir`` reaches the local tasks' dataset builders as task metadata; when None they follow the
    resolver chain (``$MOBIE_DATA_DIR``, ``shared/data`` beside the checkout, then Hugging Face).
    """
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    metadata = None
    if data_dir is not None:
        from ..data import resolve_data_dir

        metadata = {"data_dir": str(resolve_data_dir(data_dir).resolve())}  # raises for a missing dir
    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults, metadata=metadata)


def compact_results(raw: dict) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value, metric_stderr: value_or_None, "n_samples": int}}`` from simple_evaluate's output.

    lm-eval's ``"acc,none"`` keys lose their ``,none`` filter suffix (other filters keep it); a stderr that
    lm-eval reports as ``"N/A"`` (perplexities have none) becomes ``None``.
    """
    out: dict[str, dict[str, Any]] = {}
    n_samples = raw.get("n-samples", {})
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            name, _, filt = key.partition(",")
            name = name if filt == "none" else f"{name},{filt}"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[name] = float(value)
            elif name.endswith("_stderr") or name.split(",")[0].endswith("_stderr"):
                row[name] = None
        if task in n_samples:
            row["n_samples"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        out[task] = row
    return out


def _prefix_token_id(model, tokenizer) -> int | None:
    """The token lm-eval puts before every loglikelihood request. lm-eval takes the tokenizer's BOS, else its
    EOS, and fails with a bare TypeError when the tokenizer has neither; the model config often has them."""
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is not None \
            or getattr(tokenizer, "eos_token_id", None) is not None:
        return None
    cfg = getattr(model, "config", None)
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(cfg, name, None)
        tid = tid[0] if isinstance(tid, (list, tuple)) and tid else tid
        if isinstance(tid, int):
            return tid
    raise ValueError("the tokenizer defines no BOS or EOS token and the model config has no bos_token_id / "
                     "eos_token_id: lm-eval needs one to start every loglikelihood request; set "
                     "tokenizer.bos_token (or the config's bos_token_id)")


def evaluate_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | float | None = None,
                     batch_size: int = 8, num_fewshot: int = 0, data_dir: str | Path | None = None,
                     device: str = "cpu", max_length: int | None = None,
                     bootstrap_iters: int = 100_000) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an in-memory causal LM; returns :func:`compact_results`.

    ``model`` is a transformers causal LM (moved to ``device`` if it is elsewhere) or an already-built
    lm-eval ``LM``; ``limit`` caps the docs per task (lm-eval's meaning: a float < 1 is a fraction);
    ``max_length`` overrides the context length lm-eval uses for rolling windows and truncation
    (default: the model config's). Local tasks: see ``LOCAL_TASKS`` and ``eval/lm_eval_tasks/README.md``.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive int (or a fraction in (0, 1)), got {limit!r}")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an int >= 0, got {num_fewshot!r}")
    _require_lm_eval()
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM

    only_local = all(t in LOCAL_TASKS for t in tasks)
    tm = task_manager(data_dir, include_defaults=not only_local)  # lm-eval's 10k+ task index costs ~6 s
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}. Offline tasks shipped with torchao_mobie: "
            f"{sorted(LOCAL_TASKS)}; other names must be lm-eval {lm_eval.__version__} tasks "
            "(`lm_eval ls tasks`), whose datasets need the Hugging Face hub.")

    if isinstance(model, LM):
        lm = model
    else:
        import torch

        p = next(model.parameters(), None)
        if p is not None and p.device != torch.device(device):
            model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                  max_length=max_length, prefix_token_id=_prefix_token_id(model, tokenizer))
    raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False, bootstrap_iters=bootstrap_iters)
    if raw is None:  # non-zero rank in a distributed run
        return {}
    res = compact_results(raw)
    for task, row in res.items():
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v) and not k.endswith("_stderr"):
                import warnings

                warnings.warn(f"lm-eval returned a non-finite {task}/{k}={v}", RuntimeWarning, stacklevel=2)
    return res
