"""CEJD: cross-expert joint decomposition (MoBiE §4.1, reconstructed; see design/paper_and_baselines.md §2).

For one projection of one MoE layer with experts ``W_e [m, n]`` and input Hessians ``H_e [n, n]``:

* a **shared backbone** is put on the cheaper side:
    - input side (``n <= m``):  ``W_e ≈ Q_e · S``,  ``S [n, n]`` (init: ``Σ Vᵀ`` of the SVD of the
      vertically stacked experts ``[E·m, n]``);
    - output side (``m < n``):  ``W_e ≈ M · Q_e``,  ``M [m, m]`` (init: ``U Σ`` of the SVD of the
      horizontally stacked experts ``[m, E·n]``); ``M`` may be block diagonal (``blocks`` diagonal
      blocks, e.g. 2 = separate gate and up backbones for ``gate_up_proj``);
* the **per-expert factor** is binary with row and column scales, no mean:
  ``Q_e = diag(row_scale_e) · sign_e · diag(col_scale_e)`` (optionally plus a second residual plane
  ``diag(row_scale_e) · sign2_e · diag(col_scale2_e)`` on the few factor columns with the most
  output-error energy, BiLLM-style salient columns; all ``n`` columns = a full second plane);
* everything minimizes the *original* layer's output error
  ``f = Σ_e tr(G (W_e − Ŵ_e) H_e (W_e − Ŵ_e)ᵀ)`` (``G = I``, or NGES's output metric): the factor
  sees the transformed metrics (input side: right metric ``S H_e Sᵀ``; output side: left metric
  ``Mᵀ G M``), signs are chosen with GPTQ/OBC error compensation column by column inside the factor,
  then improved by greedy sign coordinate descent on ``f`` (:func:`refine_signs`), row/column scales are
  refit in closed form on ``f``, the backbone by least squares on ``f`` (output side closed form, input
  side conjugate gradient), alternating; finally the backbone is rounded to its stored dtype and the
  scales refit against the stored backbone and the factor polished against it; the scales are stored
  as log-uniform 8-bit codes (:mod:`~torchao_mobie.algorithms.scale_codes`).

Reconstruction (exact, documented; see :func:`reconstruct`)::

    Q_e      = row_scale[e][:, None] * (sign[e] * col_scale[e][None, :]
                                        + Σ_p sign_x[e, p] * col_scale_x[e, p][None, :]
                                        + sign2[e] * col_scale2[e][None, :])   (fp16 scales, ±1 signs;
                                                                                 sign_x / sign2 optional)
    W_hat[e] = backbone @ Q_e   (side "output")      W_hat[e] = Q_e @ backbone   (side "input")

with ``backbone`` the block-diagonal matrix of the stored blocks, dequantized from its stored dtype
(bfloat16, or int8 with one fp16 scale per row: ``backbone = int8 * scale[:, None]``), and the fp16
scales decoded from their 8-bit codes (``row_code``, ``col_code``, ``col_code2``, ``col_code_x`` and the
per-expert ``scale_grid [E, 3 + P, 2]``, see :func:`~torchao_mobie.algorithms.scale_codes.decode_log8`).
All computations are fp32/fp64 batched over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import workers
from .chunks import expert_chunks, factor_bytes_per_expert
from .cejd_backbone import init_backbone, quantize_backbone, refit_backbone
from .cejd_factor import (  # noqa: F401  (the factor problem's API, also reachable from here)
    FactorMetrics,
    _blockdiag,
    _factor,
    _gptq,
    _init_scales,
    _solve,
    _sym,
    factor_metrics,
    gptq_signs,
    layer_objective,
    refine_signs,
    refit_scales,
    select_salient,
)
from .factors import Backbone, CEJDFactors, ScaleCodes
from .result import BitBudget
from .scale_codes import decode_log8, encode_log8

__all__ = ["CEJDResult", "cejd_quantize", "reconstruct", "backbone_matrix", "layer_objective", "factor_metrics",
           "init_backbone", "refit_backbone", "gptq_signs", "refine_signs", "refit_scales", "quantize_backbone",
           "select_salient", "choose_side"]


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------


@dataclass
class CEJDResult:
    weight: torch.Tensor  # [E, m, n] fp32 reconstruction (exactly factors.reconstruct())
    bits: BitBudget
    factors: CEJDFactors  # the stored form (module docstring)
    objective: float  # final f (with the metric used)
    history: list


def reconstruct(factors) -> torch.Tensor:
    """``W_hat [E, m, n]`` from the stored form (:class:`~.factors.CEJDFactors` or its dict form), the
    documented formula of the module docstring."""
    return CEJDFactors.from_dict(factors).reconstruct()


def backbone_matrix(bb) -> torch.Tensor:
    """Dequantized full backbone (block diagonal) from its stored form (:class:`~.factors.Backbone` or
    ``{"blocks", "scale"}``)."""
    return (bb if isinstance(bb, Backbone) else Backbone(bb["blocks"], bb.get("scale"))).matrix()


def choose_side(m: int, n: int) -> str:
    return "input" if n <= m else "output"


def cejd_quantize(W, H, *, side: str | None = None, blocks: int = 1, backbone_dtype: str = "bfloat16",
                  G=None, rounds: int = 3, scale_rounds: int = 3, percdamp: float = 0.01,
                  cg_iters: int = 60, weights=None, salient_cols: int = 0, refine: int = 0,
                  polish: int = 0, hdamp: float = 0.0, planes: int = 1) -> CEJDResult:
    """Joint decomposition + binarization of one projection ``W [E, m, n]`` with Hessians ``H [E, n, n]``.

    side: "input" | "output" | None (auto: the cheaper side) | "none" (no backbone: the binary factor
        is fit on each ``W_e`` directly; the CEJD-off ablation).
    weights ``[E]``: per-expert weight of the joint objective (e.g. routed tokens); H is scaled by it
        (per-expert problems are scale free, the backbone refit is not).
    G ``[m, m]``: output metric (NGES); None = identity.
    rounds: binarize ↔ backbone-refit alternations.
    salient_cols: per expert, factor columns with a further binary plane (largest output-error energy).
    planes: full binary planes of the factor (1 = one sign per weight); the salient plane comes on top.
        Planes are fit jointly: signs plane by plane on each column's residual, then the scales of all
        planes on the one objective (the planes as column blocks of one wider factor, :func:`_stacked`);
        sign descent flips the first plane only, as with the salient plane.
    refine: rounds of greedy sign coordinate descent (+ scale refit) after the GPTQ sign pass of the
        last alternation only: refining earlier anchors the backbone refit to those signs and lands in a
        worse optimum (captured mixtral-8e gate_up layers: layer objective +19% on average).
    polish: refinement rounds against the final stored backbone (after its rounding and refit), which
        the factor has not seen yet (captured layers: -2% objective on qwen3moe-32e, -5% on mixtral-8e).
    hdamp: ridge added to every Hessian for all fits, ``H_e + hdamp·mean(diag H_e)·I`` (regularizes
        towards plain weight error; limits over-fitting the calibration tokens).
    """
    W = W.float()
    H = _sym(H.float())
    if hdamp > 0:
        md = H.diagonal(dim1=-2, dim2=-1).mean(-1)
        H = H + hdamp * md[:, None, None] * torch.eye(H.shape[-1], dtype=H.dtype)
    if weights is not None:
        H = H * (weights.float() / weights.float().mean().clamp_min(1e-30)).to(H.device)[:, None, None]
    E, m, n = W.shape
    if not isinstance(planes, int) or planes < 1:
        raise ValueError(f"cejd_quantize: planes must be an int >= 1, got {planes!r}")
    P = planes - 1
    side = side or choose_side(m, n)
    if side != "output":
        blocks = 1
    if side == "none":
        bb = torch.eye(n, dtype=W.dtype).unsqueeze(0)
        rounds = 1
    else:
        bb = init_backbone(W, H, "input" if side == "input" else "output", blocks)
    fside = "input" if side == "none" else side
    history = []
    # the per-expert steps run on expert chunks (the memory rule: algorithms/chunks.py)
    # (split over the ranks of a process group: torchao_mobie.workers)
    chunks = expert_chunks(E, factor_bytes_per_expert(m, n, P + 1, fside == "output" or G is not None),
                           parts=workers.world_size())
    kw = dict(P=P, percdamp=percdamp, salient_cols=salient_cols, scale_rounds=scale_rounds)
    st = None  # (B, a, b, B2, b2, sal0, sal), per expert
    for r in range(rounds):
        # no backbone: the identity is skipped (products with it are exact, so this only saves time)
        full = None if side == "none" else _blockdiag(bb)
        # refined signs in an earlier round anchor the backbone refit in a worse optimum: last round only
        parts = workers.map_chunks(lambda c: _fit_round(W[c], H[c], full, fside, G, _take(st, c),
                                                        refine=refine if r == rounds - 1 else 0, **kw), chunks)
        st = _join([p[0] for p in parts])
        Q = _cat_like([p[1] for p in parts])
        del parts
        history.append(("binarize", float(_obj(W, Q, full, fside, H, G))))
        if side == "none":
            break
        bb = refit_backbone(W, H, Q, bb, side, G, cg_iters)
        history.append(("backbone", float(_obj(W, Q, _blockdiag(bb), side, H, G))))
    backbone = None
    if side != "none":
        # store the backbone at its dtype, then refit the scales against the stored backbone
        stored, bscale, deq = quantize_backbone(bb, backbone_dtype)
        full = _blockdiag(deq)
        st = _join(workers.map_chunks(
            lambda c: _polish_chunk(W[c], H[c], full, side, G, _take(st, c), polish=polish, **kw), chunks))
        backbone = Backbone(stored, bscale)
    B, a, b, B2, b2, sal0, sal = st
    two = sal is not None
    X = xb = None
    if P:  # back from the stacked column blocks to plane-wise tensors
        X, xb = B[..., n:].view(E, m, P, n).transpose(1, 2), b[:, n:].view(E, P, n)
        B, b, B2, b2, sal = B[..., :n], b[:, :n], B2[..., :n], b2[:, :n], sal0
    # scales are stored as log-uniform 8-bit codes (scale_codes); the factors carry the codes and the
    # decoded fp16 values, which are what reconstruct() and the packed tensor compute with
    row_code, g_row = encode_log8(a)
    col_code, g_col = encode_log8(b)
    col_code2, g_col2 = encode_log8(b2) if two else (None, torch.zeros(E, 2, dtype=torch.float16))
    grids = [g_row, g_col, g_col2]
    col_code_x = None
    if P:
        col_code_x, g_x = encode_log8(xb)
        grids += list(g_x.unbind(1))
    factors = CEJDFactors(
        side=side, sign=B.to(torch.int8), row_scale=decode_log8(row_code, g_row), col_scale=decode_log8(col_code, g_col),
        backbone=backbone, sign_x=None if X is None else X.to(torch.int8),
        col_scale_x=None if X is None else decode_log8(col_code_x, g_x),
        sign2=B2.to(torch.int8) if two else None, col_scale2=decode_log8(col_code2, g_col2) if two else None,
        salient=sal, codes=ScaleCodes(row=row_code, col=col_code, grid=torch.stack(grids, 1), col2=col_code2,
                                      col_x=col_code_x))
    What = factors.reconstruct()
    history.append(("stored", float(layer_objective(W, What, H, G))))
    return CEJDResult(What, factors.bit_budget(), factors, history[-1][1], history)



def _collapse(Q, P: int):
    """``[E, m, (1+P)·n]`` stacked planes -> their sum ``[E, m, n]``."""
    if P == 0:
        return Q
    E, m, cols = Q.shape
    return Q.view(E, m, P + 1, cols // (P + 1)).sum(2)


def _fit_round(W, H, full, fside, G, st, *, P, percdamp, salient_cols, scale_rounds, refine):
    """One alternation's factor fit for fixed backbone ``full`` on a chunk of experts: GPTQ signs, scale
    refit, ``refine`` rounds of sign descent, each step kept per expert only if it helps (also against the
    previous round's factor ``st``). Returns the new state and the collapsed factor ``Q [e, m, n]``."""
    n = W.shape[-1]
    fm0 = factor_metrics(W, H, full, fside, G)
    fm = _stacked(fm0, P)
    if st is None:
        prev = None
        a, b = _init_scales(fm0.A)
        sal0 = select_salient(fm0, salient_cols)
        sal = _pad_cols(sal0, P)
    else:
        prev, (a, sal0, sal) = st[:5], (st[1], st[5], st[6])
    B, b, B2, b2, X, xb = _gptq(fm0.A, fm0.Hf, a, None if fm0.Gf is None else fm0.Gf.diagonal(dim1=-2, dim2=-1),
                                percdamp, sal0, extra=P)
    del fm0
    if P:
        B, b = torch.cat([B, *X.unbind(1)], -1), torch.cat([b, *xb.unbind(1)], -1)
        B2, b2 = _pad_cols(B2, P), _pad_cols(b2, P)
    # every closed-form step is kept per expert only if it helps: on a nearly singular Hessian (few
    # tokens) two planes on one column can cancel with scales beyond fp16
    better = lambda Q: _obj(W, _collapse(Q, P), full, fside, H, G, True)  # noqa: E731
    f = (B, a, b, B2, b2)
    # each step's per-expert objective is carried to the next comparison (one product less per step)
    f, fs = _keep_better(f, refit_scales(B.clone(), a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal), sal, better)
    # sign descent flips the first plane only: on further planes it over-fits the calibration tokens
    # (heldout-mixtral-9m seed 2: gap 0.0178 refining every plane, 0.0106 the first only)
    rcols = n if P else None
    if refine:
        f, fs = _keep_better(f, _refine(f[0].clone(), *f[1:], sal, fm, refine, scale_rounds, rcols), sal, better,
                             old_score=fs)
    if prev is not None:  # a fresh binarization can lose to the previous factor under the new backbone
        f, _ = _keep_better(prev, f, sal, better, new_score=fs)
    B, a, b, B2, b2 = f
    Q = _collapse(_factor(a, B, b, B2 if sal is not None else None, b2), P)
    return (B, a, b, B2, b2, sal0, sal), Q


def _polish_chunk(W, H, full, side, G, st, *, P, polish, scale_rounds, **_):
    """The factor of a chunk of experts refit (scales, then ``polish`` refinement rounds) against the stored
    backbone ``full``, kept per expert only if it helps."""
    B, a, b, B2, b2, sal0, sal = st
    fm = _stacked(factor_metrics(W, H, full, side, G), P)
    new = refit_scales(B.clone(), a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal)
    new = _refine(*new, sal, fm, polish, scale_rounds, W.shape[-1] if P else None)
    f, _ = _keep_better((B, a, b, B2, b2), new, sal, lambda Q: _obj(W, _collapse(Q, P), full, side, H, G, True))
    return (*f, sal0, sal)


def _take(st, c: slice):
    return None if st is None else tuple(None if t is None else t[c] for t in st)


def _join(states):
    if len(states) == 1:
        return states[0]
    return tuple(None if ts[0] is None else _cat_like(ts) for ts in zip(*states))


def _cat_like(ts):
    """``torch.cat(ts)`` along the expert dim keeping the parts' memory layout (factors derived from a
    solve are column-major per expert): the kernels that read them take layout-dependent paths, so a
    joined state must be laid out as the unchunked one for chunking not to change a bit."""
    t0 = ts[0]
    if len(ts) == 1:
        return t0
    if t0.dim() < 3 or t0.is_contiguous():
        return torch.cat(ts)
    perm = [0] + sorted(range(1, t0.dim()), key=lambda d: -t0.stride(d))
    inv = [perm.index(i) for i in range(t0.dim())]
    return torch.cat([t.permute(perm) for t in ts]).permute(inv)


def _stacked(fm: FactorMetrics, P: int) -> FactorMetrics:
    """The factor problem of ``1 + P`` full planes as one factor with ``(1 + P)·n`` columns: the weight is
    the sum of the column blocks, ``Q = [Q_0 … Q_P] Sᵀ`` with ``S = [I … I]``, so the right metric becomes
    ``S Hf Sᵀ`` (``Hf`` tiled) and the cross term ``T S``; scale refits and sign descent then work on
    every plane unchanged."""
    if P == 0:
        return fm
    k = P + 1
    return FactorMetrics(fm.Gf, fm.Hf.repeat(1, k, k), fm.T.repeat(1, 1, k), fm.A.repeat(1, 1, k))


def _pad_cols(t, P: int):
    """``t [..., n]`` followed by ``P·n`` zero (or False) columns: the salient plane lives on block 0."""
    if t is None or P == 0:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-1], P * t.shape[-1])], -1)


def _refine(B, a, b, B2, b2, sal, fm, times: int, scale_rounds: int, cols: int | None = None):
    """``times`` rounds of greedy sign descent (two sweeps, on the first ``cols`` columns) each followed by a
    closed-form scale refit."""
    for _ in range(times):
        B = refine_signs(B, a, b, fm, 2, B2 if sal is not None else None, b2, cols=cols)
        B, a, b, B2, b2 = refit_scales(B, a, b, fm, scale_rounds, B2=B2, b2=b2, salient=sal)
    return B, a, b, B2, b2


def _obj(W, Q, full, side, H, G, per_expert=False):
    What = Q if full is None else full @ Q if side == "output" else Q @ full
    return layer_objective(W, What, H, G, per_expert)


def _keep_better(old, new, sal, objective, old_score=None, new_score=None):
    """Per expert, the factor (signs and scales) with the lower layer objective, measured with the scales
    rounded to their stored fp16 (an fp16 overflow counts as infinitely bad), so no step of the
    alternation makes an expert worse: on experts with almost no calibration tokens the closed-form
    refits are ill-conditioned and a fresh binarization can diverge."""
    def score(f):
        B, a, b, B2, b2 = f
        Q = _factor(a.half().float(), B, b.half().float(), B2 if sal is not None else None,
                    None if b2 is None else b2.half().float())
        v = objective(Q)
        return torch.where(torch.isfinite(v), v, torch.full_like(v, float("inf")))

    so = score(old) if old_score is None else old_score
    sn = score(new) if new_score is None else new_score
    take = sn <= so  # [E]
    out = []
    for o, n in zip(old, new):
        if o is None or n is None:
            out.append(n)
        else:
            out.append(torch.where(take.view(-1, *([1] * (n.dim() - 1))), n, o))
    return tuple(out), torch.where(take, sn, so)
