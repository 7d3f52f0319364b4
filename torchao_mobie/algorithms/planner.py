"""Bit planning for MoBiE: which layout each projection gets and how it spends its bit budget.

One projection of ``E`` experts ``[m, n]`` can be stored three ways (:mod:`.cejd`): a joint backbone on
the input side, a joint backbone on the output side, or per-expert binary factors with no backbone
(``"none"``). Which one is best depends on how much the experts share, and the model does not say so in
its shape: on the DeepSeek-V3-style held-out model's gate_up, the output-side backbone reached a
held-back layer error of 0.045 at 1.26 bits and per-expert factors 0.030 at 1.50. So every layout whose
backbone fits the budget is a candidate; each spends the rest of the budget on second binary planes over
its most salient factor columns (up to all ``n``: a full second plane), and the candidate with the lowest
LM loss on held-back calibration sequences (:mod:`torchao_mobie.calibration.heldback`) is kept, a joint
layout only when it wins clearly (:func:`select_plan`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch


from .factors import backbone_bits, factor_bits
from .scale_codes import CODE_BITS

__all__ = ["DOWN_SLACK", "MARGIN", "MAX_PLANES", "Plan", "bits_estimate", "gate_up_target", "plan_candidates", "select_plan"]

log = logging.getLogger(__name__)

MARGIN = 0.02  # bits kept free of the cap for the estimate's rounding
MAX_PLANES = 4  # full binary planes per factor (budgets up to ~4-5 bits per weight)
DOWN_SLACK = 0.01  # bits kept off down_proj's share so a layer never exceeds the cap by rounding


@dataclass(frozen=True)
class Plan:
    side: str  # "input" | "output" | "none"
    dtype: str  # stored backbone dtype
    salient: int  # factor columns with a further (salient) binary plane, per expert
    bits: float  # estimated all-inclusive bits per weight
    planes: int = 1  # full binary planes


def bits_estimate(E: int, m: int, n: int, side: str, dtype: str, salient: int = 0, planes: int = 1) -> float:
    """All-inclusive bits per weight a layout will store, before fitting it: the stored-bit formula
    (:func:`~.factors.factor_bits`) for ``planes`` full planes, ``salient`` salient columns per expert and
    a one-block backbone (input side n×n, output side m×m) shared by the ``E`` experts."""
    k = {"none": 0, "output": m, "input": n}[side]
    bb = backbone_bits(1, k, dtype) if k else 0
    return factor_bits(E, m, n, planes=planes, salient_slots=E * max(0, salient), backbone=bb).all_inclusive_bits


def plan_candidates(E: int, m: int, n: int, cap: float, sides, dtype: str, salient: int | None = None) -> list[Plan]:
    """The layouts of ``sides`` whose backbone fits ``cap``, each with as many salient columns as the cap
    leaves (or exactly ``salient``), after as many whole planes as fit (up to ``MAX_PLANES``): a full
    plane costs less than a salient plane on every column (no bitmap) and is fit better (its signs are
    refined with the first plane's; the salient plane's are chosen once). Never empty: when nothing fits,
    the cheapest layout without planes."""
    out = []
    for side in sides:
        base = bits_estimate(E, m, n, side, dtype)
        if base + MARGIN > cap and side != "none":
            continue
        planes = 1
        while salient is None and planes < MAX_PLANES and bits_estimate(E, m, n, side, dtype, 0, planes + 1) + MARGIN <= cap:
            planes += 1
        base = bits_estimate(E, m, n, side, dtype, 0, planes)
        if salient is not None:
            s = min(salient, n)
        else:
            per_col = (m + CODE_BITS) / (m * n)
            room = cap - MARGIN - base - 1.0 / m  # the bitmap is paid once any column is salient
            s = max(0, min(n, int(room / per_col))) if room > 0 else 0
        out.append(Plan(side, dtype, s, bits_estimate(E, m, n, side, dtype, s, planes), planes))
    if not out:
        side = min(sides, key=lambda sd: bits_estimate(E, m, n, sd, dtype))
        out.append(Plan(side, dtype, 0, bits_estimate(E, m, n, side, dtype)))
    return out


def gate_up_target(E: int, hidden: int, inter: int, cap: float, sides, dtype: str) -> float:
    """Bits per weight for every gate_up candidate of a layer with ``cap`` on average; down_proj gets the
    rest (``3·cap − 2·gate_up``). down_proj has first call on the budget, up to two full planes of its
    cheapest layout (a plane more from ~2.5 bits on): second planes pay far more there. Measured (seed 0, per-expert factors, gate_up / down
    bits): qwen3moe-32e 1.47 / 1.49 gap 0.038, 1.32 / 1.82 0.030 (some layers joint), 1.18 / 2.13 0.027;
    heldout-deepseekv3-9m 1.26 / 1.98 0.023, 1.18 / 2.13 0.020. A joint gate_up layout whose backbone
    alone exceeds the target is no candidate."""
    planes = max(2, min(MAX_PLANES, math.floor(cap + 0.5)))  # past ~2.5 bits down_proj stays a plane ahead
    down_full = min(bits_estimate(E, hidden, inter, s, dtype, 0, planes) for s in sides)
    # down_proj's cap (3·cap − 2·gate_up − DOWN_SLACK) must still hold its planes plus the planner's MARGIN
    return (3 * cap - down_full - MARGIN - DOWN_SLACK) / 2


def select_plan(plans: list[Plan], fit, score, name: str = "", reference: str = "none", z: float = 2.0):
    """``(plan, fit(plan), mean scores)`` of the plan whose fit has the lowest mean ``score`` (NaN: +inf).

    ``score`` may return one value or one per held-back sequence ``[S]``; with per-sequence scores a plan
    only displaces the ``reference`` layout when it is better by more than ``z`` standard errors of the
    paired per-sequence difference (a noisy win of a few sequences does not carry to the whole data). A
    single plan is returned without fitting (``None``, no scores)."""
    if len(plans) == 1:
        return plans[0], None, []
    fits, raw = [], []
    for p in plans:
        f = fit(p)
        s = torch.as_tensor(score(f), dtype=torch.float64).reshape(-1)
        raw.append(torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s))
        fits.append(f)
    means = [float(s.mean()) for s in raw]
    best = min(range(len(plans)), key=means.__getitem__)
    ref = next((i for i, p in enumerate(plans) if p.side == reference), None)
    if ref is not None and best != ref and raw[best].numel() > 1 and math.isfinite(means[ref]):
        d = raw[best] - raw[ref]
        if not float(d.mean()) < -z * float(d.std()) / math.sqrt(d.numel()):
            best = ref
    log.debug("%s: %s -> %s", name, ", ".join(f"{p.side}x{p.planes}+{p.salient} ({p.bits:.2f} b): {m:.6g}"
                                               for p, m in zip(plans, means)), plans[best].side)
    return plans[best], fits[best], means
