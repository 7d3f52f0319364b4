"""Layer-wise GLAS (issue 18): stored layer boundaries, one layer recomputed and backpropagated at a time,
equal to the whole-model backward pass. The stated tolerance is float summation order (rtol 1e-5); on
the zoo the two agree bit for bit, which is asserted too so that a change that loses it is noticed."""

from __future__ import annotations

import pytest
import torch

from torchao_mobie.calibration.activations import ActivationStore
from torchao_mobie.calibration.glas_graphs import KeptGraphs
from torchao_mobie.calibration.glas_layerwise import ModelLayers, forward_boundaries, glas_from_graphs, \
    layerwise_glas_weights, lm_loss_sum
from torchao_mobie.calibration.gradients import compute_glas_weights
from torchao_mobie.integrations.transformers import discover_moe_layout
from torchao_mobie.pipeline.batches import CalibrationBatch
from torchao_mobie.pipeline.sequential import capture_layer_inputs, lm_head_of
from torchao_mobie.zoo import available, load_zoo_model

RTOL = 1e-5  # documented tolerance: the same operations, summed in a possibly different order


def _layerwise(model, layout, batches, budget=None):
    hidden, calls = capture_layer_inputs(model, layout, batches)
    head = lm_head_of(model)
    layers = ModelLayers(layout)
    with ActivationStore(budget=budget) as store:
        forward_boundaries(layers, hidden, calls, store)
        spilled = store.spilled
        out = layerwise_glas_weights(layers, batches, calls, store, lambda h, b: lm_loss_sum(head(h), b))
    return out, spilled


@pytest.mark.parametrize("name", available())
def test_layerwise_glas_equals_the_whole_model_backward(name):
    model, _ = load_zoo_model(name)
    layout = discover_moe_layout(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4000, (3, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 40:] = 0  # a padded row: its padding is left out of the loss in both
    batches = [CalibrationBatch(ids[:2], None), CalibrationBatch(ids[2:], mask[2:])]
    whole = compute_glas_weights(model, layout.experts(), batches)
    layer, _ = _layerwise(model, layout, batches)
    # only activation gradients are formed: no weight gradient is left on the user's model (the LM head's
    # backward used to leave the final norm's and the tied embedding's)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert list(layer.index) == list(whole.index) == [e.fqn for e in layout.experts()]
    exact = True
    for f in whole.index:
        for b in range(len(batches)):
            assert torch.equal(layer.index[f][b], whole.index[f][b])
            for a, w in ((layer.gate_up[f][b], whole.gate_up[f][b]), (layer.down[f][b], whole.down[f][b])):
                torch.testing.assert_close(a, w, rtol=RTOL, atol=0.0)
                exact &= torch.equal(a, w)
    assert exact, "equal within the tolerance but no longer bit for bit on the zoo"


def test_boundaries_spilled_to_disk_give_the_same_weights():
    model, _ = load_zoo_model("micro-qwen3moe")
    layout = discover_moe_layout(model)
    batches = [CalibrationBatch(torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(1)), None)]
    mem, spilled_mem = _layerwise(model, layout, batches)
    disk, spilled_disk = _layerwise(model, layout, batches, budget=0)
    assert spilled_mem == 0 and spilled_disk > 0
    for f in mem.index:
        assert torch.equal(mem.gate_up[f][0], disk.gate_up[f][0]) and torch.equal(mem.down[f][0], disk.down[f][0])


def test_activation_store_size_rule(tmp_path):
    t = [torch.ones(4, 8), torch.zeros(2, 8)]  # 192 bytes a level
    with ActivationStore(budget=200, directory=str(tmp_path)) as s:
        s.put(0, t)
        s.put(1, t)  # over the budget: on disk
        assert s.held == 192 and s.spilled == 192 and len(list(tmp_path.iterdir())) == 1
        assert all(torch.equal(a, b) for a, b in zip(s.get(1), t))
        s.drop(1)
        assert not list(next(tmp_path.iterdir()).iterdir())  # the level file is gone
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["micro-qwen3moe", "mixtral-8e"])
def test_capture_keeps_the_boundaries_forward_boundaries_recomputes(name):
    """quantize_model takes layer-wise GLAS's boundaries from its capture forward: the same values, bit for bit,
    for the leading ``record`` batches; past the activation budget it keeps none (GLAS then runs its own pass)."""
    model, _ = load_zoo_model(name)
    layout = discover_moe_layout(model)
    g = torch.Generator().manual_seed(2)
    batches = [CalibrationBatch(torch.randint(3, 4000, (2, 24), generator=g), None) for _ in range(3)]
    hidden, calls, kept = capture_layer_inputs(model, layout, batches, record=2)
    assert len(kept) == len(layout.layers) + 1 and all(len(level) == 2 for level in kept)
    with ActivationStore() as store:
        forward_boundaries(ModelLayers(layout), hidden[:2], [c[:2] for c in calls], store)
        for i, level in enumerate(kept):
            assert all(torch.equal(a, b) for a, b in zip(level, store.get(i)))
    level_bytes = sum(h.numel() * h.element_size() for h in hidden[:2])
    assert capture_layer_inputs(model, layout, batches, record=2, budget=level_bytes)[2] is None
    assert len(capture_layer_inputs(model, layout, batches)) == 2


def test_dense_first_layer_bottom_layer_stops_at_the_experts():
    """DeepSeek-V3 with a dense first layer (``first_k_dense_replace=1``): the bottom layer has no experts and is
    not backpropagated, the lowest MoE layer's backward stops at its experts output; still the whole-model
    weights, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=128, hidden_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                               intermediate_size=32, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1,
                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=16,
                               qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    layout = discover_moe_layout(model)
    assert layout.layers[0].moe is None and len(layout.experts()) == 2
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    batches = [CalibrationBatch(ids, None)]
    whole = compute_glas_weights(model, layout.experts(), batches)
    calls = []
    handle = layout.layers[0].module.register_forward_hook(lambda *a: calls.append(1))
    layer, _ = _layerwise(model, layout, batches)
    handle.remove()
    assert len(calls) == 2  # the capture and the boundaries' forward; GLAS does not recompute it
    graphs = KeptGraphs(model, layout, 1, budget=2**31)
    capture_layer_inputs(model, layout, batches, graphs=graphs)
    head = lm_head_of(model)
    kept = glas_from_graphs(graphs, [None if ly.moe is None else ly.moe.experts for ly in layout.layers], batches,
                            lambda h, b: lm_loss_sum(head(h), b))
    for f in whole.index:
        for got in (layer, kept):
            assert torch.equal(got.gate_up[f][0], whole.gate_up[f][0]) and torch.equal(got.down[f][0], whole.down[f][0])



def _batches():
    ids = torch.randint(3, 4000, (3, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 40:] = 0
    return [CalibrationBatch(ids[:2], None), CalibrationBatch(ids[2:], mask[2:])]


@pytest.mark.parametrize("name", available())
def test_kept_capture_graphs_give_the_whole_model_weights_bit_for_bit(name):
    """quantize_model's capture forward keeps each layer's graph (within the activation budget) and GLAS
    backpropagates through them instead of recomputing: the same pair weights, bit for bit, no weight gradient
    left, the parameters' requires_grad flags restored, and the capture's own outputs unchanged."""
    model, _ = load_zoo_model(name)
    layout = discover_moe_layout(model)
    batches = _batches()
    whole = compute_glas_weights(model, layout.experts(), batches)
    plain = capture_layer_inputs(model, layout, batches, record=len(batches))
    flags = [p.requires_grad for p in model.parameters()]
    graphs = KeptGraphs(model, layout, len(batches), budget=2**31)
    hidden, calls, levels = capture_layer_inputs(model, layout, batches, record=len(batches), graphs=graphs)
    assert graphs.complete and graphs.bytes > 0
    assert [p.requires_grad for p in model.parameters()] == flags
    for a, b in zip(plain[2] + [plain[0]], levels + [hidden]):  # boundaries and layer-0 inputs: the same values
        assert all(torch.equal(x, y) and not y.requires_grad for x, y in zip(a, b))
    head = lm_head_of(model)
    infos = [None if layer.moe is None else layer.moe.experts for layer in layout.layers]
    kept = glas_from_graphs(graphs, infos, batches, lambda h, b: lm_loss_sum(head(h), b))
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert list(kept.index) == list(whole.index)
    for f in whole.index:
        for b in range(len(batches)):
            assert torch.equal(kept.index[f][b], whole.index[f][b])
            assert torch.equal(kept.gate_up[f][b], whole.gate_up[f][b]) and torch.equal(kept.down[f][b], whole.down[f][b])


def test_graphs_past_the_budget_are_not_kept():
    model, _ = load_zoo_model("micro-qwen3moe")
    layout = discover_moe_layout(model)
    graphs = KeptGraphs(model, layout, 2, budget=1024)
    capture_layer_inputs(model, layout, _batches(), record=2, graphs=graphs)
    assert not graphs.complete and graphs.bytes > 1024
    assert all(not x for lists in (graphs.leaves, graphs.roots, graphs.calls) for x in lists)
