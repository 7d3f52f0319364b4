"""Where the experts, routers and linear layers of a transformers MoE model live.

transformers 5 stores the routed experts of every supported family in one module per layer whose
``forward(hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k])`` is dispatched by the experts
interface (``integrations/moe.py``). Its two fused 3D parameters are, in the default layout,
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``; the layout flags
(``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``) are set on the module by
``use_experts_implementation``. This module finds, without per-family tables:

* the decoder layers (the ``nn.ModuleList`` that holds the experts modules),
* per layer: the MoE block (parent of the experts module), its router (``gate``/``router``), shared
  experts (``shared_expert``/``shared_experts``, gated or not), gates kept in full precision
  (``shared_expert_gate``), the attention linears, and the dense MLP of non-MoE layers.

Verified on every MoE text family of transformers 5 (tests/test_families.py), gpt_oss included (transposed
``[E, in, out]`` weights, interleaved gate/up, biases, a clamped activation: every consumer goes through
:class:`ExpertsInfo`, whose :meth:`~ExpertsInfo.weight` is always ``[E, out, in]`` and whose gating is the
module's own). Experts classes without the interface flags are read through an adapter (:mod:`.adapters`:
llama4's ``Llama4TextExperts``); any other such class, and experts without a gate (``has_gate=False``),
are rejected with :class:`UnsupportedMoELayoutError` naming the module.

Row order of ``gate_up_proj``: the algorithms see ``weight("gate_up_proj")``, the ``[E, 2I, H]`` matrix
whose row ``r`` is output ``r`` of the stored projection, in storage order: gate rows then up rows for
concatenated layouts, ``gate_0, up_0, gate_1, up_1, ...`` for gpt_oss (interleaved). Packing keeps that
order, so the packed factor's rows are the checkpoint's output columns and the module's own gating reads
the packed projection's output as it reads the original one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ADAPTERS, ExpertsAdapter, ExpertsCall, UnsupportedMoELayoutError, adapter_of, interface_call

__all__ = [
    "PROJECTIONS",
    "ExpertsCall",
    "ExpertsInfo",
    "LinearInfo",
    "MoEBlockInfo",
    "DecoderLayerInfo",
    "MoEModelLayout",
    "NoMoELayersError",
    "UnsupportedMoELayoutError",
    "discover_moe_layout",
    "is_experts_module",
    "experts_info",
    "experts_call_args",
]

#: The two fused expert projections, in the order a token meets them.
PROJECTIONS = ("gate_up_proj", "down_proj")

# Linear layers whose input is produced inside their own block (true-sequential second stage).
_OUTPUT_LINEAR_NAMES = frozenset({"o_proj", "out_proj", "down_proj", "dense", "c_proj", "w2", "wo"})
_ROUTER_NAMES = ("gate", "router")
_MLP_CHILD_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe")
_EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


class NoMoELayersError(ValueError):
    """The model has no fused MoE experts module, so there is nothing for this backend to binarize."""


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------


def is_experts_module(module: nn.Module) -> bool:
    """True for a fused MoE experts module: 3D ``gate_up_proj`` and ``down_proj`` parameters."""
    gu = getattr(module, "gate_up_proj", None)
    dn = getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


@dataclass(eq=False)
class ExpertsInfo:
    """One fused experts module and its layout.

    Every consumer reads and writes expert weights through :meth:`weight` / :meth:`set_weight`, which
    always use the ``[E, out, in]`` orientation of ``nn.functional.linear`` whatever the storage
    (``is_transposed`` modules store ``[E, in, out]``).
    """

    fqn: str
    module: nn.Module
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    #: the layout of a class without the experts-interface flags (None: the interface's own)
    adapter: ExpertsAdapter | None = None

    def in_features(self, projection: str) -> int:
        _check_projection(projection)
        return self.hidden_dim if projection == "gate_up_proj" else self.intermediate_dim

    def out_features(self, projection: str) -> int:
        _check_projection(projection)
        return 2 * self.intermediate_dim if projection == "gate_up_proj" else self.hidden_dim

    def parameter(self, projection: str) -> nn.Parameter:
        _check_projection(projection)
        return getattr(self.module, projection)

    def weight(self, projection: str) -> torch.Tensor:
        """The ``[E, out, in]`` view of one projection (no copy)."""
        w = self.parameter(projection)
        return w.transpose(-1, -2) if self.is_transposed else w

    def bias(self, projection: str) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return getattr(self.module, f"{projection}_bias", None)

    @torch.no_grad()
    def set_weight(self, projection: str, w3d: torch.Tensor) -> None:
        """Write an ``[E, out, in]`` tensor into the parameter in place (dtype and layout kept)."""
        param = self.parameter(projection)
        expected = (self.num_experts, self.out_features(projection), self.in_features(projection))
        if tuple(w3d.shape) != expected:
            raise ValueError(f"{self.fqn}.{projection}: expected a {list(expected)} [E, out, in] tensor, "
                             f"got {list(w3d.shape)}")
        src = w3d.transpose(-1, -2) if self.is_transposed else w3d
        param.data.copy_(src.to(device=param.device, dtype=param.dtype))

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The module's own gating: ``gate_up`` output ``[.., 2I]`` -> ``down_proj`` input ``[.., I]`` (handles
        interleaved gate/up and clamped activations such as GPT-OSS's)."""
        if self.adapter is not None:
            return self.adapter.apply_gate(self.module, gate_up)
        return self.module._apply_gate(gate_up)

    def call(self, args: tuple, kwargs: dict) -> ExpertsCall:
        """One forward call of the module (as a forward hook sees it) as routed rows (:class:`ExpertsCall`)."""
        if self.adapter is not None:
            return self.adapter.call(self.module, args, kwargs)
        return interface_call(args, kwargs)

    def down_input(self, x: torch.Tensor, expert: int, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """Input of ``down_proj`` for rows ``x [n, H]`` routed to ``expert``: ``act(gate) * up``.

        Computed in fp32 from the module's *current* ``gate_up_proj`` (so after gate_up has been
        binarized it is the input the binarized model really feeds to down_proj), or from ``gate_up``
        (``[E, 2I, H]``, e.g. the full-precision weight), with the module's own gating (:meth:`apply_gate`).
        """
        w = (self.weight("gate_up_proj") if gate_up is None else gate_up)[expert].float()
        gate_up = x.float() @ w.t()
        b = self.bias("gate_up_proj")
        if b is not None:
            gate_up = gate_up + b[expert].float()
        return self.apply_gate(gate_up)


def _check_projection(projection: str) -> None:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")


def experts_info(module: nn.Module, fqn: str = "") -> ExpertsInfo:
    """Read and validate the layout of one experts module (clear error when unsupported)."""
    name = fqn or type(module).__name__
    if not is_experts_module(module):
        raise UnsupportedMoELayoutError(
            f"{name} ({type(module).__name__}) is not a fused experts module: expected 3D parameters "
            "`gate_up_proj` and `down_proj`")
    adapter = None
    missing = [f for f in _EXPERTS_FLAGS if not hasattr(module, f)]
    if missing:
        adapter = adapter_of(module)
        if adapter is None:
            raise UnsupportedMoELayoutError(
                f"{name} ({type(module).__name__}) has 3D expert weights but lacks the layout flags {missing} that "
                "transformers' `use_experts_implementation` sets, and no torchao_mobie adapter knows its class; only "
                "experts modules using the transformers experts interface (forward(hidden_states, top_k_index, "
                f"top_k_weights)) and the adapted classes ({', '.join(sorted(ADAPTERS))}) are supported")
    flags = {f: bool(getattr(adapter if adapter is not None else module, f)) for f in _EXPERTS_FLAGS}
    if not flags["has_gate"]:
        raise UnsupportedMoELayoutError(
            f"{name} ({type(module).__name__}) has has_gate=False (no gate projection); expected gated experts "
            "with `gate_up_proj` holding gate and up rows")
    if adapter is None and not hasattr(module, "_apply_gate"):
        raise UnsupportedMoELayoutError(f"{name} ({type(module).__name__}) has no `_apply_gate` method")
    gu, dn = module.gate_up_proj, module.down_proj
    e = gu.shape[0]
    if flags["is_transposed"]:
        hidden, two_i = gu.shape[1], gu.shape[2]
        inter, hidden_dn = dn.shape[1], dn.shape[2]
        expected = "gate_up_proj [E, H, 2I] and down_proj [E, I, H] (is_transposed=True)"
    else:
        two_i, hidden = gu.shape[1], gu.shape[2]
        hidden_dn, inter = dn.shape[1], dn.shape[2]
        expected = "gate_up_proj [E, 2I, H] and down_proj [E, H, I]"
    if dn.shape[0] != e or hidden_dn != hidden or two_i != 2 * inter:
        raise UnsupportedMoELayoutError(
            f"{name} ({type(module).__name__}): expected {expected}, got gate_up_proj {list(gu.shape)} and "
            f"down_proj {list(dn.shape)}")
    return ExpertsInfo(fqn=fqn, module=module, num_experts=e, hidden_dim=hidden, intermediate_dim=inter, **flags,
                       adapter=adapter)


def experts_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts-interface call, positional or keyword
    (:meth:`ExpertsInfo.call` also reads the calls of adapted classes)."""
    c = interface_call(args, kwargs)
    return c.hidden, c.top_k_index, c.top_k_weights


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LinearInfo:
    """An ``nn.Linear`` that a scope may binarize.

    kind: "attention" | "shared_experts" | "dense_mlp".
    stage: "in" when its input is the block input, "out" when its input is produced inside the block
    (o_proj, down_proj): true-sequential quantization re-collects "out" statistics after "in".
    """

    fqn: str
    module: nn.Linear
    kind: str
    stage: str


@dataclass(eq=False)
class MoEBlockInfo:
    fqn: str
    module: nn.Module
    experts: ExpertsInfo
    router_fqn: str | None
    router: nn.Module | None
    shared_experts: list[LinearInfo] = field(default_factory=list)
    #: Full-precision-only modules inside the block besides the router (e.g. qwen2_moe's
    #: ``shared_expert_gate``), by fqn.
    gates: list[str] = field(default_factory=list)


@dataclass(eq=False)
class DecoderLayerInfo:
    index: int
    fqn: str
    module: nn.Module
    moe: MoEBlockInfo | None
    attention: list[LinearInfo] = field(default_factory=list)
    dense_mlp: list[LinearInfo] = field(default_factory=list)

    def linears(self, kinds) -> list[LinearInfo]:
        """Linear layers of this decoder layer whose kind is in ``kinds``, attention first."""
        out = [li for li in self.attention if li.kind in kinds]
        if self.moe is not None:
            out += [li for li in self.moe.shared_experts if li.kind in kinds]
        out += [li for li in self.dense_mlp if li.kind in kinds]
        return out


@dataclass(eq=False)
class MoEModelLayout:
    model_class: str
    layers_fqn: str
    layers: list[DecoderLayerInfo]

    @property
    def moe_layers(self) -> list[DecoderLayerInfo]:
        return [layer for layer in self.layers if layer.moe is not None]

    def experts(self) -> list[ExpertsInfo]:
        return [layer.moe.experts for layer in self.moe_layers]

    def never_binarized(self) -> list[str]:
        """Module fqns kept in full precision whatever the scope: routers and gates."""
        out = []
        for layer in self.moe_layers:
            if layer.moe.router_fqn:
                out.append(layer.moe.router_fqn)
            out += layer.moe.gates
        return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _stage(name: str) -> str:
    return "out" if name.rsplit(".", 1)[-1] in _OUTPUT_LINEAR_NAMES else "in"


def _linears(module: nn.Module, prefix: str, kind: str) -> list[LinearInfo]:
    return [LinearInfo(_join(prefix, n), m, kind, _stage(n))
            for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _moe_block(block: nn.Module, block_fqn: str, experts_name: str, experts: ExpertsInfo) -> MoEBlockInfo:
    router_name, router = None, None
    for name in _ROUTER_NAMES:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module) and child is not experts.module:
            router_name, router = name, child
            break
    if router is None:  # a router under another attribute name: match the class name
        for name, child in block.named_children():
            if type(child).__name__.lower().endswith("router"):
                router_name, router = name, child
                break
    info = MoEBlockInfo(fqn=block_fqn, module=block, experts=experts,
                        router_fqn=_join(block_fqn, router_name) if router_name else None, router=router)
    for name, child in block.named_children():
        if name in (experts_name, router_name):
            continue
        fqn = _join(block_fqn, name)
        if "shared" in name and not name.endswith("gate"):
            info.shared_experts += _linears(child, fqn, "shared_experts")
        elif isinstance(child, nn.Linear) or any(isinstance(m, nn.Linear) for m in child.modules()):
            info.gates.append(fqn)  # shared_expert_gate and any other unknown linear: never binarized
    return info


def discover_moe_layout(model: nn.Module) -> MoEModelLayout:
    """Find decoder layers, MoE blocks, experts, routers, shared experts, attention and dense MLPs.

    Raises :class:`NoMoELayersError` when the model has no fused experts module and
    :class:`UnsupportedMoELayoutError` when an experts module's layout cannot be read.
    """
    model_class = type(model).__name__
    experts_fqns = [n for n, m in model.named_modules() if is_experts_module(m)]
    if not experts_fqns:
        raise NoMoELayersError(
            f"{model_class} has no MoE experts module (a module with 3D `gate_up_proj [E, 2I, H]` and "
            "`down_proj [E, H, I]` parameters, as transformers >= 5 builds for qwen3_moe, qwen2_moe, mixtral, "
            "olmoe, deepseek_v2/v3, ...); torchao_mobie only binarizes MoE experts")
    modules = dict(model.named_modules())

    # The decoder-layer container: the deepest ModuleList on the path to every experts module.
    def container_of(fqn: str) -> tuple[str, int]:
        parts = fqn.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if isinstance(modules.get(prefix), nn.ModuleList) and parts[i].isdigit():
                return prefix, int(parts[i])
        raise UnsupportedMoELayoutError(
            f"{model_class}: experts module {fqn} is not inside an nn.ModuleList of decoder layers")

    located = [(fqn, *container_of(fqn)) for fqn in experts_fqns]
    containers = {c for _, c, _ in located}
    if len(containers) != 1:
        raise UnsupportedMoELayoutError(
            f"{model_class}: experts modules live in several layer lists {sorted(containers)}; expected one "
            "stack of decoder layers")
    layers_fqn = containers.pop()
    by_layer: dict[int, str] = {}
    for fqn, _, idx in located:
        if idx in by_layer:
            raise UnsupportedMoELayoutError(
                f"{model_class}: decoder layer {layers_fqn}.{idx} holds two experts modules ({by_layer[idx]}, "
                f"{fqn}); expected one MoE block per layer")
        by_layer[idx] = fqn

    layer_list = modules[layers_fqn]
    mlp_child_names = set()
    layers: list[DecoderLayerInfo] = []
    for idx, layer in enumerate(layer_list):
        layer_fqn = f"{layers_fqn}.{idx}"
        info = DecoderLayerInfo(index=idx, fqn=layer_fqn, module=layer, moe=None)
        if idx in by_layer:
            fqn = by_layer[idx]
            rel = fqn[len(layer_fqn) + 1:].split(".")
            if len(rel) < 2:
                raise UnsupportedMoELayoutError(
                    f"{model_class}: experts module {fqn} sits directly in the decoder layer; expected it inside "
                    "an MoE block together with its router")
            block_fqn = fqn.rsplit(".", 1)[0]
            info.moe = _moe_block(modules[block_fqn], block_fqn, rel[-1], experts_info(modules[fqn], fqn))
            mlp_child_names.add(rel[0])
        layers.append(info)

    for info in layers:
        mlp_child = None
        if info.moe is not None:
            mlp_child = info.moe.fqn[len(info.fqn) + 1:].split(".")[0]
        else:
            for name in [*sorted(mlp_child_names), *_MLP_CHILD_NAMES]:
                if isinstance(getattr(info.module, name, None), nn.Module):
                    mlp_child = name
                    info.dense_mlp = _linears(getattr(info.module, name), _join(info.fqn, name), "dense_mlp")
                    break
        for name, child in info.module.named_children():
            if name != mlp_child:
                info.attention += _linears(child, _join(info.fqn, name), "attention")
    return MoEModelLayout(model_class=model_class, layers_fqn=layers_fqn, layers=layers)
