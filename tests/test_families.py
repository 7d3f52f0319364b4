"""Every MoE text family of transformers 5: a tiny random model saved in hub layout, reloaded, quantized with
MoBiEConfig() (packed by default), saved with save_pretrained / save_quantized and reloaded, logits bit-exact
with the in-memory quantized model (issue 17).

Several families' checkpoints are converted by transformers on save and load (its conversion mapping:
Mixtral-style ``block_sparse_moe``, GraniteMoE's router, the ``e_score_correction_bias`` buffers of
ERNIE 4.5 / EXAONE MoE): the packed checkpoint is written in that hub layout too.
"""

from __future__ import annotations

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
}
# families whose checkpoint keys transformers 5 renames on save (and back on load)
CONVERTED = {"mixtral", "phimoe", "minimax", "granitemoe", "ernie4_5_moe", "exaone_moe"}


def _build(family: str):
    if family not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {tf.__version__} has no {family}")
    cfg = AutoConfig.for_model(family, **COMMON, num_experts_per_tok=2, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


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
    with safe_open(str(d / "q" / "model.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    names_in_memory = set(json.loads(meta["mobie_checksums"]))
    assert (keys != names_in_memory) == (family in CONVERTED)
    assert (CONVERTED_CHECKSUMS in meta) == (family in CONVERTED)

    loaded = AutoModelForCausalLM.from_pretrained(d / "q")
    assert _expert_projections_packed(loaded) and loaded.config._experts_implementation == "mobie"
    assert torch.equal(_logits(loaded, ids), ref)
    # a model loaded with from_pretrained saves again (transformers reverses its load operations)
    loaded.save_pretrained(d / "again")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(d / "again"), ids), ref)

    S.save_quantized(model, str(d / "own"))
    assert torch.equal(_logits(S.load_quantized(str(d / "own")), ids), ref)


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
