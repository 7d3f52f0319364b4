"""How an experts module is called, and the layout of experts classes without transformers' experts interface.

Every consumer of an experts module's *calls* (the calibration collectors, GLAS) reads one call as an
:class:`ExpertsCall`: routed rows ``hidden [N, H]``, each sent to the experts ``top_k_index [N, k]`` with
output weights ``top_k_weights [N, k]``. For the transformers experts interface
(``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``) a row is a token.

Experts classes that predate the interface (no ``has_gate`` / ``is_transposed`` ... flags) are supported
through an :class:`ExpertsAdapter`, found by class name in :data:`ADAPTERS`; any other class is rejected
by :func:`~torchao_mobie.integrations.transformers.experts_info`. Today one:

* ``Llama4TextExperts`` (llama4): ``gate_up_proj [E, H, 2I]`` (transposed, gate columns then up
  columns), ``down_proj [E, I, H]``, no biases, ``up * act(gate)``. Its MoE block (``Llama4TextMoe``)
  scales the *input* by the router score (sigmoid of the top-k logits, 0 for the other experts), repeats
  every token for every expert and calls ``experts(routed_in [E*T, H])``, expert ``e`` taking rows
  ``e*T:(e+1)*T``; the routed outputs are summed without further weights. A call is therefore read in the
  *pair* domain: row ``e*T + t`` is the input expert ``e`` really sees for token ``t`` (``score * x``,
  rounded as the model rounds it), routed to ``e`` alone with output weight 1 when the token selected
  ``e``, to no expert otherwise (index ``E``, dropped by :func:`~torchao_mobie.calibration.routing.route_tokens`).
  A row is selected iff it is not all zero: the router gives exactly 0 to the other experts, and a zero row
  adds nothing to any statistic (only a token's count, for a score that underflows to 0). Token-level masks
  (padding, held-back batches) reach the rows through :attr:`ExpertsCall.token_index`; the layer-level
  statistics (``Σ x xᵀ`` of the pooled expert inputs: the gate_up fallback of starved experts) are over the
  selected rows (:attr:`ExpertsCall.in_layer`), i.e. the score-scaled inputs the experts see, not the
  router input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ADAPTERS", "ExpertsAdapter", "ExpertsCall", "UnsupportedMoELayoutError", "adapter_of", "interface_call"]

_HIDDEN_NAMES = ("hidden_states",)
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores")


class UnsupportedMoELayoutError(ValueError):
    """An experts module exists but its layout is not one this backend knows how to read."""


@dataclass
class ExpertsCall:
    """One call of an experts module as routed rows.

    hidden: ``[N, H]`` expert inputs; top_k_index / top_k_weights: ``[N, k]`` experts of each row (indices
    outside ``[0, E)`` are no expert) and the weights of their outputs.
    token_index: ``[N]`` batch token of each row, when rows are not the batch's tokens (None: row i is token i).
    in_layer: ``[N]`` bool, the rows counted in layer-level statistics (None: every row).
    """

    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    token_index: torch.Tensor | None = None
    in_layer: torch.Tensor | None = None

    def rows(self, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A ``[T]`` per-token mask (padding, held-back tokens) as a ``[N]`` per-row mask."""
        if token_mask is None or self.token_index is None:
            return token_mask
        return token_mask.reshape(-1).to(self.token_index.device)[self.token_index]


def interface_call(args: tuple, kwargs: dict) -> ExpertsCall:
    """The call of a transformers-interface experts module: ``(hidden_states, top_k_index, top_k_weights)``,
    positional or keyword."""
    values = list(args[:3])
    for names in (_HIDDEN_NAMES, _INDEX_NAMES, _WEIGHT_NAMES)[len(values):]:
        for n in names:
            if n in kwargs:
                values.append(kwargs[n])
                break
        else:
            raise UnsupportedMoELayoutError(
                "experts module called without (hidden_states, top_k_index, top_k_weights); got "
                f"{len(args)} positional arguments and keywords {sorted(kwargs)}")
    return ExpertsCall(values[0], values[1], values[2])


@dataclass(frozen=True)
class ExpertsAdapter:
    """The layout of an experts class without the experts-interface flags (see the module docstring)."""

    class_name: str
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    #: ``(module, args, kwargs) -> ExpertsCall`` of one forward call
    call: Callable[[nn.Module, tuple, dict], ExpertsCall]
    #: ``(module, gate_up_out [.., 2I]) -> down input [.., I]``, the class's own gating
    apply_gate: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _llama4_call(module: nn.Module, args: tuple, kwargs: dict) -> ExpertsCall:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise UnsupportedMoELayoutError(f"{type(module).__name__} called without hidden_states; got {len(args)} positional "
                               f"arguments and keywords {sorted(kwargs)}")
    E, H = module.gate_up_proj.shape[0], module.gate_up_proj.shape[1]
    rows = x.reshape(-1, H)
    if rows.shape[0] % E:
        raise UnsupportedMoELayoutError(f"{type(module).__name__}: {rows.shape[0]} input rows are not {E} experts x tokens")
    T = rows.shape[0] // E
    dev = rows.device
    selected = rows.ne(0).any(-1)
    expert = torch.arange(E, device=dev).repeat_interleave(T)
    index = torch.where(selected, expert, torch.full_like(expert, E))[:, None]
    return ExpertsCall(rows, index, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=dev),
                       token_index=torch.arange(T, device=dev).repeat(E), in_layer=selected)


def _llama4_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * module.act_fn(gate)


ADAPTERS: dict[str, ExpertsAdapter] = {
    "Llama4TextExperts": ExpertsAdapter("Llama4TextExperts", has_gate=True, has_bias=False, is_transposed=True,
                                        is_concatenated=True, call=_llama4_call, apply_gate=_llama4_gate),
}


def adapter_of(module: nn.Module) -> ExpertsAdapter | None:
    """The adapter of ``module``'s class (by name), or None."""
    return ADAPTERS.get(type(module).__name__)
