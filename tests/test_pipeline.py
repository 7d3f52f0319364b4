"""Calibration statistics, configs and the quantization pipeline on tiny random MoE models.

The binarizers here are test doubles (a per-row sign whose scale minimizes the Hessian-weighted error,
so results depend on the statistics); the real algorithms get an end-to-end smoke test at the end.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchao_mobie as tm
from torchao_mobie.algorithms.result import BinarizedWeight, BitBudget
from torchao_mobie.calibration import ExpertStatsCollector
from torchao_mobie.config import BinarizationConfig
from torchao_mobie.integrations.transformers import (
    NoMoELayersError,
    UnsupportedMoELayoutError,
    discover_moe_layout,
    experts_info,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "olmoe": dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy"),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread. With two threads on a loaded 2-core machine, OpenMP waits make the
    many small ops of the binarizers hundreds of times slower (measured: ARB-X on 32x32, 0.02 s -> 8 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(family: str = "qwen3_moe", layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, num_hidden_layers=layers, **COMMON, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(cfg).eval()


def calib(n: int = 8, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)


def forward_with_hooks(model, ids: torch.Tensor, handles: list, batch: int = 8) -> None:
    """Run ``model`` on ``ids`` in batches of ``batch`` rows without gradients, then remove the hook ``handles``
    (whatever happens): for tests that read activations through their own hooks."""
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model(input_ids=ids[i:i + batch])
    finally:
        for h in handles:
            h.remove()


# ---- test binarizers -------------------------------------------------------------------------------


def hessian_sign(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> BinarizedWeight:
    """``α_r sign(W_r)`` with ``α_r`` minimizing ``(w - αb)ᵀ H (w - αb)``: depends on H."""
    H = H + (percdamp * H.diagonal().mean() + 1e-8) * torch.eye(H.shape[0])
    B = torch.where(W >= 0, 1.0, -1.0)
    BH = B @ H
    alpha = (BH * W).sum(1, keepdim=True) / (BH * B).sum(1, keepdim=True)
    return BinarizedWeight(alpha * B, BitBudget(n_weights=W.numel(), sign_bits=W.numel(), param_bits=16 * W.shape[0]))


@dataclass
class HSignConfig(BinarizationConfig):
    def binarize_matrix(self, W, H):
        return hessian_sign(W, H, self.percdamp)


@dataclass
class RecordingConfig(HSignConfig):
    calls: dict = field(default_factory=dict, repr=False, compare=False)

    def quantize_experts(self, W3d, H3d, *, context=None):
        self.calls[context.name] = (W3d.clone(), H3d.clone(), context)
        return super().quantize_experts(W3d, H3d, context=context)


def is_binary_rows(w: torch.Tensor) -> bool:
    """Every row of ``[..., out, in]`` holds values of one magnitude (±α_r)."""
    a = w.abs().float()
    return bool(torch.allclose(a, a.amax(-1, keepdim=True).expand_as(a), rtol=1e-4, atol=1e-6))


def is_sign_rows(w: torch.Tensor) -> bool:
    """Every row of ``[..., out, in]`` takes at most two values (α·sign + μ)."""
    return all(len(torch.unique(row)) <= 2 for row in w.detach().reshape(-1, w.shape[-1]))


def experts_of(model, i=None):
    layout = discover_moe_layout(model)
    infos = layout.experts()
    return infos if i is None else infos[i]


def moe_input_hook(store: list):
    def hook(module, args, kwargs):
        store.append((args[0].detach().clone(), args[1].clone()))
    return hook


def per_expert_mean_hessians(inputs, info, proj="gate_up_proj"):
    """Independent reference: loop over tokens and slots, one outer product each."""
    E, Hd, I = info.num_experts, info.hidden_dim, info.intermediate_dim
    d = Hd if proj == "gate_up_proj" else I
    sums, counts = torch.zeros(E, d, d, dtype=torch.float64), torch.zeros(E, dtype=torch.int64)
    gu = info.weight("gate_up_proj").detach().double()
    for x_all, idx in inputs:
        for t in range(x_all.shape[0]):
            for e in idx[t].tolist():
                x = x_all[t].double()
                if proj == "down_proj":
                    x = F.silu(gu[e, :I] @ x) * (gu[e, I:] @ x)
                sums[e] += torch.outer(x, x)
                counts[e] += 1
    return sums, counts


# ---- calibration statistics --------------------------------------------------------------------------


def test_expert_hessians_equal_per_token_loop():
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", layers=1)
    info = experts_of(model, 0)
    E, k = info.num_experts, 2
    batches = []
    for T in (7, 12):
        x = torch.randn(T, info.hidden_dim)
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        batches.append((x, idx))
    col = ExpertStatsCollector(info, min_expert_tokens=1)
    for x, idx in batches:
        col.observe(x, idx, torch.rand(x.shape[0], k))
    for proj in ("gate_up_proj", "down_proj"):
        ref_sums, ref_counts = per_expert_mean_hessians(batches, info, proj)
        assert torch.equal(col.counts, ref_counts)
        torch.testing.assert_close(col.sums[proj].double(), ref_sums, rtol=1e-5, atol=1e-5)
        h = col.finalize(proj)
        torch.testing.assert_close(h.hessian.double(), ref_sums / ref_counts.view(-1, 1, 1), rtol=1e-5, atol=1e-6)
    # layer-level sums: every token once
    x_all = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(col.layer_sum_xxt, x_all.t() @ x_all, rtol=1e-5, atol=1e-5)
    assert col.layer_tokens == x_all.shape[0]


def test_routing_weighted_hessians_weight_each_pair_by_its_squared_gate():
    """MoBiE's route_weighted collector: ``Σ g²·x xᵀ / count`` per expert (the block-output error)."""
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", layers=1)
    info = experts_of(model, 0)
    E, k, T = info.num_experts, 2, 40
    x = torch.randn(T, info.hidden_dim)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    g = torch.rand(T, k)
    col = ExpertStatsCollector(info, ("gate_up_proj",), min_expert_tokens=1, routing_weighted=True).attach()
    try:
        col._hook(info.module, (x, idx, g), {})
    finally:
        col.detach()
    h = col.finalize("gate_up_proj").hessian.double()
    for e in range(E):
        t, s = (idx == e).nonzero(as_tuple=True)
        xe, we = x[t].double(), g[t, s].double() ** 2
        ref = (xe * we[:, None]).t() @ xe / max(len(t), 1)
        torch.testing.assert_close(h[e], ref, rtol=1e-5, atol=1e-6)


def test_masked_tokens_and_out_of_range_experts_are_ignored():
    model = tiny_model("qwen3_moe", layers=1)
    info = experts_of(model, 0)
    x = torch.randn(6, info.hidden_dim)
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 4], [4, 1]])  # 4 = "no expert" slot
    col = ExpertStatsCollector(info, ("gate_up_proj",), min_expert_tokens=1)
    col.token_mask = torch.tensor([True, True, False, True, True, True])
    col.observe(x, idx)
    assert col.counts.tolist() == [3, 3, 1, 1]  # unmasked: [3, 3, 2, 2]
    assert col.layer_tokens == 5


def test_down_inputs_are_act_gate_times_up_for_every_family():
    """ExpertsInfo.down_input and weight() reproduce each family's own experts forward (incl. GPT-OSS)."""
    for family in FAMILIES:
        model = tiny_model(family, layers=2)
        info = experts_of(model, 0)
        module = info.module
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() == 2:  # gpt_oss biases are zero-initialized: make them matter
                    p.normal_(0, 0.1)
        x = torch.randn(5, info.hidden_dim)
        e = 1
        idx = torch.full((5, 1), e)
        with torch.no_grad():
            out = module(x, idx, torch.ones(5, 1))
            a = info.down_input(x, e)
            ref = a @ info.weight("down_proj")[e].float().t()
            if info.bias("down_proj") is not None:
                ref = ref + info.bias("down_proj")[e]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=family)
        if not info.is_transposed:  # explicit act(gate)·up with gate rows first
            I = info.intermediate_dim
            w = info.weight("gate_up_proj")[e]
            torch.testing.assert_close(a, F.silu(x @ w[:I].t()) * (x @ w[I:].t()), msg=family)


def route_away(dead: int, num_experts: int):
    """Router forward hook that never selects expert ``dead`` (each token keeps distinct experts)."""
    def hook(module, args, output):
        logits, weights, idx = output
        idx = idx.clone()
        for t in range(idx.shape[0]):
            row = idx[t].tolist()
            if dead in row:
                free = [e for e in range(num_experts) if e not in row and e != dead]
                idx[t, row.index(dead)] = free[0]
        return logits, weights, idx
    return hook


def test_dead_expert_falls_back_to_layer_hessian(caplog):
    model = tiny_model("qwen3_moe", layers=1)
    layout = discover_moe_layout(model)
    moe = layout.layers[0].moe
    dead = 3
    moe.router.register_forward_hook(route_away(dead, moe.experts.num_experts))
    fp = copy.deepcopy(model)
    seen = []
    fp.model.layers[0].mlp.experts.register_forward_pre_hook(moe_input_hook(seen), with_kwargs=True)
    with torch.no_grad():
        for b in calib().split(8):
            fp(b)

    cfg = RecordingConfig(min_expert_tokens=4)
    with caplog.at_level(logging.WARNING, logger="torchao_mobie"):
        report = tm.quantize_model(model, cfg, calib(), progress=False)

    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = {ev.projection: ev for ev in report.fallback_events}
    assert set(events) == {"gate_up_proj", "down_proj"}
    assert all(dead in ev.experts and ev.token_counts[ev.experts.index(dead)] == 0 for ev in events.values())
    lines = [r.getMessage() for r in caplog.records if "min_expert_tokens" in r.getMessage()]
    assert len(lines) == 1 and f"{dead}:0" in lines[0] and "model.layers.0" in lines[0]

    # gate_up: E[x xᵀ] over every token entering the experts module
    x_all = torch.cat([x for x, _ in seen]).double()
    _, H_gu, _ = cfg.calls[f"{moe.experts.fqn}.gate_up_proj"]
    torch.testing.assert_close(H_gu[dead].double(), x_all.t() @ x_all / x_all.shape[0], rtol=1e-5, atol=1e-6)
    # down: that expert's own act(gate)·up on every token, with its *binarized* gate_up (true-sequential)
    I = moe.experts.intermediate_dim
    gu = moe.experts.weight("gate_up_proj")[dead].double()
    a = F.silu(x_all @ gu[:I].t()) * (x_all @ gu[I:].t())
    _, H_dn, _ = cfg.calls[f"{moe.experts.fqn}.down_proj"]
    torch.testing.assert_close(H_dn[dead].double(), a.t() @ a / a.shape[0], rtol=1e-5, atol=1e-6)


def test_all_experts_starved_never_nan():
    model = tiny_model("olmoe", layers=1)
    report = tm.quantize_model(model, HSignConfig(min_expert_tokens=10_000), calib(2, 4), progress=False)
    assert sum(len(ev.experts) for ev in report.fallback_events) == 2 * 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_router_stats_match_router_inputs():
    model = tiny_model("qwen2_moe", layers=2)
    fp = copy.deepcopy(model)
    seen = []
    fp.model.layers[0].mlp.gate.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in calib().split(8):
            fp(b)
    report = tm.quantize_model(model, HSignConfig(), calib(), progress=False)
    x = torch.cat(seen).double()
    st = report.router_stats["model.layers.0.mlp"]
    assert st.count == x.shape[0] == calib().numel()
    torch.testing.assert_close(st.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.second_moment.double(), x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert set(report.router_stats) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_padding_is_excluded_from_statistics():
    model = tiny_model("mixtral", layers=1)
    ids = calib(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    report = tm.quantize_model(model, HSignConfig(), [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert report.calibration_tokens == 13
    assert report.router_stats["model.layers.0.mlp"].count == 13


# ---- sequential pipeline ------------------------------------------------------------------------------


def test_layer_statistics_come_from_already_quantized_layers():
    model = tiny_model("qwen3_moe", layers=2)
    fp = copy.deepcopy(model)
    cfg = RecordingConfig(min_expert_tokens=1)
    tm.quantize_model(model, cfg, calib(), progress=False)
    ex0, ex1 = experts_of(model)
    _, H1, _ = cfg.calls[f"{ex1.fqn}.gate_up_proj"]

    def layer1_hessians(m):
        seen = []
        h = m.model.layers[1].mlp.experts.register_forward_pre_hook(moe_input_hook(seen), with_kwargs=True)
        with torch.no_grad():
            for b in calib().split(8):
                m(b)
        h.remove()
        sums, counts = per_expert_mean_hessians(seen, experts_of(m, 1))
        return sums / counts.view(-1, 1, 1)

    # reference: full-precision model with layer 0's experts replaced by the binarized ones
    ref = copy.deepcopy(fp)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            getattr(ref.model.layers[0].mlp.experts, p).copy_(getattr(ex0.module, p))
    torch.testing.assert_close(H1.double(), layer1_hessians(ref), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(H1.double(), layer1_hessians(fp), rtol=1e-3, atol=1e-5)  # the test can fail

    # true-sequential inside layer 0: down_proj's Hessian uses the binarized gate_up
    _, H0_down, _ = cfg.calls[f"{ex0.fqn}.down_proj"]
    seen = []
    ref0 = copy.deepcopy(fp)
    with torch.no_grad():
        ref0.model.layers[0].mlp.experts.gate_up_proj.copy_(ex0.module.gate_up_proj)
    ref0.model.layers[0].mlp.experts.register_forward_pre_hook(moe_input_hook(seen), with_kwargs=True)
    with torch.no_grad():
        for b in calib().split(8):
            ref0(b)
    sums, counts = per_expert_mean_hessians(seen, experts_of(ref0, 0), "down_proj")
    torch.testing.assert_close(H0_down.double(), sums / counts.view(-1, 1, 1), rtol=1e-4, atol=1e-6)


def test_layer_inputs_are_replayed_with_each_layers_own_kwargs():
    """Sliding-window and full-attention layers get different masks: replaying layer by layer with the
    captured per-layer kwargs must reproduce the model's own forward."""
    from torchao_mobie.pipeline.batches import calibration_batches as _calibration_batches
    from torchao_mobie.pipeline.sequential import capture_layer_inputs as _capture_layer_inputs

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", num_hidden_layers=2, sliding_window=4, **COMMON, **FAMILIES["gpt_oss"])
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layout = discover_moe_layout(model)
    batches = _calibration_batches(calib(2, 16), 8, "cpu")
    hidden, calls = _capture_layer_inputs(model, layout, batches)
    assert not torch.equal(calls[0][0][1]["attention_mask"], calls[1][0][1]["attention_mask"])
    with torch.no_grad():
        h = hidden[0]
        for layer in layout.layers:
            args, kwargs = calls[layer.index][0]
            h = layer.module(h, *args, **kwargs)
        ref = model.model(batches[0].input_ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), ref)


def test_deterministic():
    a, b = tiny_model("olmoe"), tiny_model("olmoe")
    tm.quantize_model(a, HSignConfig(scope=["routed_experts", "attention"]), calib(), progress=False)
    tm.quantize_model(b, HSignConfig(scope=["routed_experts", "attention"]), calib(), progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def changed_params(before: nn.Module, after: nn.Module) -> set[str]:
    ref = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, ref[n])}


def test_scope_default_and_extended():
    fp = tiny_model("qwen2_moe", layers=2)
    m = copy.deepcopy(fp)
    report = tm.quantize_model(m, HSignConfig(), calib(), progress=False)
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert changed_params(fp, m) == experts == set(report.parameters)
    assert all(is_binary_rows(getattr(m.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1])) for n in experts)

    m = copy.deepcopy(fp)
    tm.quantize_model(m, HSignConfig(scope=["routed_experts", "shared_experts", "attention", "dense_mlp"]),
                      calib(), progress=False)
    changed = changed_params(fp, m)
    attention = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"}
    shared = {f"model.layers.{i}.mlp.shared_expert.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")}
    assert changed == experts | attention | shared
    for n in changed - experts:
        assert is_binary_rows(m.get_parameter(n)), n
    # never: routers, shared_expert_gate, embeddings, norms, lm_head, biases
    assert not any(s in n for n in changed for s in ("mlp.gate.", "shared_expert_gate", "embed", "norm", "lm_head",
                                                     "bias"))

    # dense MLP layers (deepseek first_k_dense_replace) only with dense_mlp in scope
    fp = tiny_model("deepseek_v2", layers=2)
    m = copy.deepcopy(fp)
    tm.quantize_model(m, HSignConfig(scope=["dense_mlp"]), calib(), progress=False)
    assert changed_params(fp, m) == {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


# ---- torchao-native flow ------------------------------------------------------------------------------


def run_calibration(model, ids):
    with torch.no_grad():
        for b in ids.split(8):
            model(b)


def test_observe_convert_equals_quantize_model_on_one_layer():
    fp = tiny_model("qwen3_moe", layers=1)
    cfg = HSignConfig(min_expert_tokens=1)
    seq = copy.deepcopy(fp)
    tm.quantize_model(seq, cfg, calib(16), progress=False, true_sequential=False)

    ao = copy.deepcopy(fp)
    tm.quantize_(ao, replace(cfg, step="observe"))
    experts = ao.model.layers[0].mlp.experts
    assert len(experts._forward_pre_hooks) == 1 and torch.equal(experts.gate_up_proj, fp.model.layers[0].mlp.experts.gate_up_proj)
    run_calibration(ao, calib(16))
    tm.quantize_(ao, cfg)
    assert len(experts._forward_pre_hooks) == 0 and not hasattr(experts, "_mobie_observer")
    for p in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(experts, p), getattr(seq.model.layers[0].mlp.experts, p),
                                   rtol=1e-5, atol=1e-7)
    report = tm.QuantizationReport.from_model(ao)
    assert set(report.parameters) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert not report.data_free and "model.layers.0.mlp" in report.router_stats

    free = copy.deepcopy(fp)
    tm.quantize_(free, cfg)  # data-free differs: the statistics mattered
    assert not torch.allclose(free.model.layers[0].mlp.experts.down_proj, experts.down_proj)


def test_data_free_convert_runs_and_logs(caplog):
    fp = tiny_model("mixtral", layers=2)
    m = copy.deepcopy(fp)
    with caplog.at_level(logging.WARNING, logger="torchao_mobie"):
        tm.quantize_(m, HSignConfig())
    lines = [r.getMessage() for r in caplog.records if "data-free" in r.getMessage()]
    assert len(lines) == 1 and "without activation-aware saliency" in lines[0] and "without error compensation" in lines[0]
    assert changed_params(fp, m) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    report = tm.QuantizationReport.from_model(m)
    assert len(report.data_free) == 4 and report.bits.paper_bits == 1.0
    assert torch.isfinite(m(calib(1)).logits).all()


def test_fqn_to_config_route_and_torchao_filter():
    from torchao.quantization import FqnToConfig
    from torchao.quantization import quantize_ as ao_quantize_

    fp = tiny_model("qwen3_moe", layers=2)
    cfg = HSignConfig()
    ref = copy.deepcopy(fp)
    tm.quantize_(ref, replace(cfg, step="observe"))
    run_calibration(ref, calib())
    tm.quantize_(ref, cfg)

    def fqn_cfg(c):
        return FqnToConfig({r"re:.*\.experts\.gate_up_proj": c, r"re:.*\.experts\.down_proj": c})

    m = copy.deepcopy(fp)
    ao_quantize_(m, fqn_cfg(replace(cfg, step="observe")), filter_fn=None)
    run_calibration(m, calib())
    ao_quantize_(m, fqn_cfg(cfg), filter_fn=None)
    assert changed_params(fp, m) == changed_params(fp, ref)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)

    m = copy.deepcopy(fp)  # plain torchao.quantize_ with the exported filter (data-free)
    ao_quantize_(m, cfg, filter_fn=tm.moe_experts_filter)
    assert changed_params(fp, m) == changed_params(fp, ref)

    m = copy.deepcopy(fp)  # torchao's default filter (every nn.Linear, lm_head included) is refused
    with pytest.raises(ValueError, match="lm_head are never binarized"):
        ao_quantize_(m, cfg)
    assert not changed_params(fp, m)

    m = copy.deepcopy(fp)  # FqnToConfig on attention linears through the scope-aware wrapper
    tm.quantize_(m, FqnToConfig({r"re:.*\.q_proj\.weight": cfg}))
    assert changed_params(fp, m) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_binarizing_twice_raises():
    m = tiny_model("qwen3_moe", layers=1)
    tm.quantize_(m, HSignConfig())
    with pytest.raises(RuntimeError, match="already binarized"):
        tm.quantize_(m, HSignConfig())
    with pytest.raises(RuntimeError, match="already binarized"):
        tm.quantize_model(m, HSignConfig(), calib(), progress=False)


def test_convert_without_calibration_batches_raises():
    m = tiny_model("qwen3_moe", layers=1)
    tm.quantize_(m, HSignConfig(step="observe"))
    with pytest.raises(RuntimeError, match="no tokens were observed"):
        tm.quantize_(m, HSignConfig())


# ---- families, layouts, configs -----------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_builds_and_quantizes(family):
    fp = tiny_model(family, layers=2)
    m = copy.deepcopy(fp)
    report = tm.quantize_model(m, HSignConfig(), calib(), progress=False)
    infos = experts_of(m)
    assert infos and set(report.parameters) == {f"{e.fqn}.{p}" for e in infos for p in ("gate_up_proj", "down_proj")}
    for e in infos:
        for p in ("gate_up_proj", "down_proj"):
            assert is_binary_rows(e.weight(p)), (family, e.fqn, p)
    assert report.bits.paper_bits == 1.0 and report.bits.all_inclusive_bits > 1.0
    assert changed_params(fp, m) == set(report.parameters)
    with torch.no_grad():
        assert torch.isfinite(m(calib(2)).logits).all()


def test_model_without_moe_layers_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(NoMoELayersError, match="LlamaForCausalLM"):
        tm.quantize_model(m, HSignConfig(), calib(), progress=False)


def test_unsupported_experts_layout_is_rejected():
    class LegacyExperts(nn.Module):  # 3D weights but not the transformers experts interface
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))

    with pytest.raises(UnsupportedMoELayoutError, match="LegacyExperts.*layout flags"):
        experts_info(LegacyExperts(), "model.layers.0.mlp.experts")
    m = LegacyExperts()
    m.has_gate, m.has_bias, m.is_transposed, m.is_concatenated = False, False, False, True
    with pytest.raises(UnsupportedMoELayoutError, match="has_gate=False"):
        experts_info(m, "x")


def test_config_validation_and_serialization():
    from torchao.core.config import config_from_dict, config_to_dict

    with pytest.raises(ValueError, match=r"scope.*never binarized"):
        tm.BiLLMConfig(scope=["routed_experts", "router"])
    with pytest.raises(ValueError, match=r"BiLLMConfig\.scope: unknown entry 'mlp'"):
        tm.BiLLMConfig(scope=["mlp"])
    with pytest.raises(ValueError, match=r"percdamp"):
        tm.BiLLMConfig(percdamp=-0.1)
    with pytest.raises(ValueError, match=r"ARBLLMConfig\.step"):
        tm.ARBLLMConfig(step="prepare")
    with pytest.raises(ValueError, match=r"ARBLLMConfig\.variant"):
        tm.ARBLLMConfig(variant="braq")
    with pytest.raises(ValueError, match=r"HBLLMConfig\.haar must be one of \('row', 'col'\), got 'rows'"):
        tm.HBLLMConfig(haar="rows")
    with pytest.raises(ValueError, match=r"HBLLMConfig\.group_partition"):
        tm.HBLLMConfig(group_partition="col")
    with pytest.raises(ValueError, match=r"HBLLMConfig\.salient_up_lim"):
        tm.HBLLMConfig(salient_up_lim=1)
    from torchao_mobie.config import BiLLMConfig  # the baselines moved to torchao_mobie.baselines; old paths load
    assert BiLLMConfig is tm.BiLLMConfig
    hb = tm.HBLLMConfig(group_partition="global", haar="col")
    assert config_from_dict(config_to_dict(hb)) == hb
    with pytest.raises(ValueError, match=r"min_expert_tokens"):
        tm.SignBinaryConfig(min_expert_tokens=0)
    with pytest.raises(TypeError, match="abstract"):
        BinarizationConfig()
    cfg = tm.ARBLLMConfig(variant="rc", scope=[tm.Scope.ATTENTION, "routed_experts"])
    assert cfg.scope == ["routed_experts", "attention"]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_quantize_experts_is_the_primary_interface():
    """A config overriding quantize_experts sees whole [E, out, in] projections with [E, in, in] Hessians."""
    seen = []

    @dataclass
    class Joint(HSignConfig):
        def quantize_experts(self, W3d, H3d, *, context=None):
            seen.append((context.projection, tuple(W3d.shape), tuple(H3d.shape), context.token_counts))
            return super().quantize_experts(W3d, H3d, context=context)

    m = tiny_model("qwen3_moe", layers=1)
    tm.quantize_model(m, Joint(), calib(), progress=False)
    assert [s[:3] for s in seen] == [("gate_up_proj", (4, 32, 32), (4, 32, 32)), ("down_proj", (4, 32, 16), (4, 16, 16))]
    assert int(seen[0][3].sum()) == calib().numel() * 2


# ---- real algorithms (helper-1's torchao_mobie.algorithms) --------------------------------------------


@pytest.mark.parametrize("make", [lambda: tm.SignBinaryConfig(), lambda: tm.BiLLMConfig(blocksize=16),
                                  lambda: tm.ARBLLMConfig(variant="x", iters=3, blocksize=16),
                                  lambda: tm.ARBLLMConfig(variant="rc", iters=3),
                                  lambda: tm.HBLLMConfig(blocksize=16)],
                         ids=["sign", "billm", "arb-x", "arb-rc", "hbllm"])
def test_real_algorithms_end_to_end(make):
    cfg = make()
    fp = tiny_model("qwen3_moe", layers=1)
    m = copy.deepcopy(fp)
    report = tm.quantize_model(m, cfg, calib(), progress=False)
    assert changed_params(fp, m) == set(report.parameters) and len(report.parameters) == 2
    assert 1.0 <= report.bits.paper_bits < 2.5 and report.bits.all_inclusive_bits > report.bits.paper_bits
    if isinstance(cfg, tm.HBLLMConfig):  # + a split-group bit per coefficient and 12 fp16 values per row of a block
        assert report.bits.all_inclusive_bits > 2 * report.bits.paper_bits
    if isinstance(cfg, tm.SignBinaryConfig):
        assert all(is_sign_rows(experts_of(m, 0).weight(p)) for p in ("gate_up_proj", "down_proj"))
    with torch.no_grad():
        assert torch.isfinite(m(calib(2)).logits).all()


def test_package_has_a_version():
    import torchao_mobie

    assert isinstance(torchao_mobie.__version__, str) and torchao_mobie.__version__.split(".")[0].isdigit()
