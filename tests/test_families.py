"""Every MoE text family of transformers 5: a tiny random model saved in hub layout, reloaded, quantized with
MoBiEConfig() (packed by default), saved with save_pretrained / save_quantized and reloaded, logits bit-exact
with the in-memory quantized model (issue 17).

Several families' checkpoints are converted by transformers on save and load (its conversion mapping:
Mixtral-style ``block_sparse_moe``, GraniteMoE's router, the ``e_score_correction_bias`` buffers of
ERNIE 4.5 / EXAONE MoE): the packed checkpoint is written in that hub layout too.

gpt_oss (``[E, in, out]`` weights, interleaved gate/up, biases, clamped activation) and llama4 (``[E, in, out]``
weights, an experts class outside transformers' experts interface, score-scaled expert inputs) store their
packed parameters as transposed views of ``[E, out, in]`` data (format version 3).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import torchao_mobie.storage as S
from torchao_mobie import MoBiEConfig, quantize_model
from torchao_mobie.integrations.transformers import discover_moe_layout
from torchao_mobie.storage.serialization import CONVERTED_CHECKSUMS

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, intermediate_size=32)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)
ROUTED = dict(n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0)
FAMILIES = {
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=32),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "mixtral": dict(num_local_experts=4),
    "olmoe": dict(num_experts=4),
    "deepseek_v2": dict(**ROUTED, **MLA, n_group=1, topk_group=1),
    "deepseek_v3": dict(**ROUTED, **MLA, n_group=1, topk_group=1),
    "glm4_moe": dict(**ROUTED, n_group=1, topk_group=1, head_dim=32),
    "hunyuan_v1_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=32),
    "dots1": dict(**ROUTED, n_group=1, topk_group=1, head_dim=32),
    "phimoe": dict(num_local_experts=4),
    "minimax": dict(num_local_experts=4, head_dim=32),
    "granitemoe": dict(num_local_experts=4),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_intermediate_size=32, moe_layer_start_index=0),
    "exaone_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=32, first_k_dense_replace=0),
    "gpt_oss": dict(num_local_experts=4, head_dim=32),
    "llama4_text": dict(num_local_experts=4, head_dim=32, intermediate_size_mlp=64, interleave_moe_layer_step=1),
}
# families whose checkpoint keys transformers 5 renames on save (and back on load)
CONVERTED = {"mixtral", "phimoe", "minimax", "granitemoe", "ernie4_5_moe", "exaone_moe"}
# families whose experts store [E, in, out] (packed: transposed views, format version 3)
TRANSPOSED = {"gpt_oss", "llama4_text"}
# families whose experts are outside transformers' experts interface (no "mobie" experts implementation: the
# packed weights run through MoBiETensor's bmm)
NO_EXPERTS_INTERFACE = {"llama4_text"}


def _build(family: str):
    if family not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {tf.__version__} has no {family}")
    cfg = AutoConfig.for_model(family, **COMMON, num_experts_per_tok=2, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj_bias"):  # gpt_oss's expert biases are zero-initialized: make them matter
                p.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _expert_projections_packed(model) -> bool:
    experts = discover_moe_layout(model).experts()
    return bool(experts) and all(isinstance(getattr(e.module, p), S.MoBiETensor)
                                 for e in experts for p in ("gate_up_proj", "down_proj"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """family -> (quantized packed model, checkpoint directory, probe ids); built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            _build(family).save_pretrained(d / "fp")  # hub layout
            model = AutoModelForCausalLM.from_pretrained(d / "fp", dtype=torch.float32).eval()
            calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
            quantize_model(model, MoBiEConfig(), calib, progress=False, batch_size=2)
            model.save_pretrained(d / "q")
            ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
            cache[family] = model, d, ids
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_round_trip(family, quantized):
    model, d, ids = quantized(family)
    assert _expert_projections_packed(model)
    ref = _logits(model, ids)
    # the packed forward computes the dequantized (fake-quant) model, in another summation order
    fake = _logits(S.unpack_model(copy.deepcopy(model)), ids)
    assert (ref - fake).abs().max() <= 1e-4 * fake.abs().max()
    with safe_open(str(d / "q" / "model.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    names_in_memory = set(json.loads(meta["mobie_checksums"]))
    assert (keys != names_in_memory) == (family in CONVERTED)
    assert (CONVERTED_CHECKSUMS in meta) == (family in CONVERTED)
    described = json.loads(meta["mobie_tensors"])
    assert {d.get("transposed", False) for d in described.values()} == {family in TRANSPOSED}
    assert meta["mobie_format_version"] == ("3" if family in TRANSPOSED else "2")
    for fqn, desc in described.items():  # the parameter's own shape ([E, in, out] when transposed)
        assert tuple(desc["shape"]) == tuple(model.get_parameter(fqn).shape), fqn

    loaded = AutoModelForCausalLM.from_pretrained(d / "q")
    impl = "eager" if family in NO_EXPERTS_INTERFACE else "mobie"
    assert _expert_projections_packed(loaded) and loaded.config._experts_implementation == impl
    assert torch.equal(_logits(loaded, ids), ref)
    for name, p in model.named_parameters():  # gpt_oss's biases: plain tensors in their own dtype
        if name.endswith("_proj_bias"):
            assert name in keys and type(p) is torch.nn.Parameter and torch.equal(loaded.get_parameter(name), p)
    # a model loaded with from_pretrained saves again (transformers reverses its load operations)
    loaded.save_pretrained(d / "again")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(d / "again"), ids), ref)

    S.save_quantized(model, str(d / "own"))
    assert torch.equal(_logits(S.load_quantized(str(d / "own")), ids), ref)


def test_llama4_expert_statistics_are_the_score_scaled_inputs():
    """llama4's MoE block multiplies each expert's input by the token's router score and runs every expert on
    every token (score 0 for the unselected ones): per expert, the collector sees exactly the inputs
    ``score·x`` of the tokens that selected it, masked tokens left out."""
    from torchao_mobie.calibration import ExpertStatsCollector

    model = _build("llama4_text")
    info = discover_moe_layout(model).experts()[0]
    block = model.model.layers[0].feed_forward
    seen = []
    hook = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    col = ExpertStatsCollector(info, min_expert_tokens=1).attach()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(ids.numel(), dtype=torch.bool)
    mask[[3, 17]] = False  # padding
    col.token_mask = mask
    try:
        with torch.no_grad():
            model(ids)
    finally:
        col.detach()
        hook.remove()
    gu, dn = col.finalize("gate_up_proj"), col.finalize("down_proj")
    k = model.config.num_experts_per_tok
    assert col.layer_tokens == int(mask.sum()) * k  # the selected (token, expert) rows
    x = seen[0].reshape(-1, info.hidden_dim)
    with torch.no_grad():
        scores, logits = block.router(x)
        top = torch.topk(logits, k, dim=1).indices
        for e in range(info.num_experts):
            tokens = ((top == e).any(1) & mask).nonzero().squeeze(1)
            assert int(gu.counts[e]) == int(dn.counts[e]) == tokens.numel() > 0
            xe = x[tokens] * scores[tokens, e, None]  # what expert e computes on
            gate, up = (xe @ info.module.gate_up_proj[e]).chunk(2, dim=-1)
            a = up * info.module.act_fn(gate)
            torch.testing.assert_close(gu.hessian[e], xe.t() @ xe / tokens.numel(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(dn.hessian[e], a.t() @ a / tokens.numel(), rtol=1e-5, atol=1e-7)


def _rewrite(path, drop=None, flip=None):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if flip is not None:
        t = tensors[flip].contiguous()
        t.view(torch.uint8).view(-1)[0] ^= 0xFF
        tensors[flip] = t
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("family", ["mixtral", "ernie4_5_moe"])
def test_converted_checkpoint_errors(family, quantized, tmp_path):
    """Corrupted and incomplete files are reported by their (hub-layout) tensor name."""
    import shutil

    _, d, _ = quantized(family)
    with safe_open(str(d / "q" / "model.safetensors"), framework="pt") as f:
        keys, in_memory = sorted(f.keys()), set(json.loads(f.metadata()["mobie_checksums"]))
    packed_key = next(k for k in keys if "._down_proj_qdata" in k)
    renamed = sorted(set(keys) - in_memory - {packed_key})[0]  # a plain tensor transformers renamed
    for what, kw, match in (("corrupt", dict(flip=packed_key), f"{packed_key} is corrupted"),
                            ("corrupt-plain", dict(flip=renamed), f"{renamed} is corrupted"),
                            ("truncated", dict(drop=renamed), f"{renamed} is missing")):
        shutil.copytree(d / "q", tmp_path / what)
        _rewrite(tmp_path / what / "model.safetensors", **kw)
        with pytest.raises(S.MoBiECheckpointError, match=match.replace(".", r"\.")):
            AutoModelForCausalLM.from_pretrained(tmp_path / what)
