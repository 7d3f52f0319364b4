"""Bad input: every case gets a specific message (which argument, what was expected), and nothing the user had
is modified by the failure (in-memory models: the weights are compared with a snapshot).

Covered elsewhere (not repeated here): a model without MoE layers (test_pipeline::
test_model_without_moe_layers_is_rejected), experts modules without the transformers interface
(test_pipeline::test_unsupported_experts_layout_is_rejected), a token stream shorter than seqlen and
n_samples <= 0 in the data loader (test_data::test_calibration_samples_seeded_windows), binarizing twice in
memory (test_pipeline::test_binarizing_twice_raises), corrupted / truncated / missing-tensor / version-99
checkpoints through the library (test_storage::test_corrupted_truncated_and_version).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import torchao_mobie as tm
from torchao_mobie.cli import CLIError, main
from torchao_mobie.integrations.transformers import UnsupportedMoELayoutError, experts_info


# ---- helpers ---------------------------------------------------------------------------------------------


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap) -> None:
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in sd.items():
        assert torch.equal(v.nan_to_num(), snap[k].nan_to_num()), k
    assert not tm.QuantizationReport.from_model(model).parameters  # no binarization record left
    assert not getattr(model.config, "torchao_mobie", None)


@pytest.fixture
def model(micro):
    return copy.deepcopy(micro[0])


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(3, 4096, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def cli_error(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit status 2, ``error: ...`` on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err, err
    return err


def quantize_argv(out, *extra, model="micro-qwen3moe", method="sign"):
    return ["quantize", "--model", str(model), "--method", method, "--out", str(out), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", *extra]


# ---- model ------------------------------------------------------------------------------------------------


def test_unsupported_experts_layout_names_the_module_in_quantize_model(model):
    snap = snapshot(model)
    model.model.layers[1].mlp.experts.down_proj = nn.Parameter(torch.zeros(8, 64, 16))  # I=16, gate_up says 32
    snap["model.layers.1.mlp.experts.down_proj"] = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    with pytest.raises(UnsupportedMoELayoutError,
                       match=r"model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\): expected gate_up_proj \[E, 2I, H\]"):
        tm.quantize_model(model, tm.BiLLMConfig(), calib(), progress=False)
    assert_unchanged(model, snap)


def test_nan_in_expert_weights_is_named_before_anything_changes(model):
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
        model.model.layers[1].mlp.experts.down_proj[3, 1, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj has 2 non-finite values "
                                         r"\(NaN/Inf\) \(first in expert 3\)"):
        tm.quantize_model(model, tm.BiLLMConfig(), calib(), progress=False)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"down_proj has 2 non-finite"):  # torchao-native flow too
        tm.quantize_(model, tm.BiLLMConfig())
    assert_unchanged(model, snap)


# ---- calibration data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,error,match", [
    (torch.zeros(0, 32, dtype=torch.long), ValueError, r"calibration is empty: a tensor of shape \[0, 32\]"),
    ([], ValueError, "calibration is empty"),
    (torch.rand(4, 32) * 100, TypeError, "calibration token ids must be integers, got dtype torch.float32"),
    (torch.randint(0, 4096, (300,)), ValueError, r"\(2-D\), got a 1-D tensor .*calibration_samples"),
    (torch.randint(0, 4096, (2, 4, 32)), ValueError, r"\(2-D\), got a 3-D tensor of shape \[2, 4, 32\]"),
])
def test_bad_calibration_tensor(model, data, error, match):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        tm.quantize_model(model, tm.BiLLMConfig(), data, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad_id", [-1, 4096, 10**6])
def test_token_ids_outside_the_vocabulary(model, bad_id):
    snap = snapshot(model)
    data = calib()
    data[2, 5] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the model's vocabulary \[0, 4096\)"):
        tm.quantize_model(model, tm.BiLLMConfig(), data, progress=False)
    assert_unchanged(model, snap)


def test_calibration_longer_than_the_context(model):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"sequences of 600 tokens are longer than the model's context "
                                         r"\(config.max_position_embeddings=512\)"):
        tm.quantize_model(model, tm.BiLLMConfig(), calib(1, 600), progress=False)
    assert_unchanged(model, snap)


def test_nan_calibration_activations_are_named_by_layer(model):
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")  # tied with lm_head: only token 7 is affected
    snap = snapshot(model)
    data = calib()
    data[1, 3] = 7
    with pytest.raises(FloatingPointError, match=r"non-finite calibration activations \(NaN/Inf\) entering "
                                                 r"model\.layers\.0 \(the embedding output\) on calibration batch 0"):
        tm.quantize_model(model, tm.BiLLMConfig(), data, progress=False)
    assert_unchanged(model, snap)
    assert not model.model.layers[0]._forward_pre_hooks  # the capture hooks are gone

    # observe/convert flow: the statistics hook names the experts module
    tm.quantize_(model, tm.BiLLMConfig(step="observe"))
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.mlp\.experts: \d+ non-finite calibration "
                                                 r"activations"):
        with torch.no_grad():
            model(data)


# ---- Hessians ---------------------------------------------------------------------------------------------


def test_expert_with_only_zero_inputs_falls_back(micro):
    from torchao_mobie.calibration import ExpertStatsCollector

    info = experts_info(micro[0].model.layers[0].mlp.experts, "model.layers.0.mlp.experts")
    x = torch.randn(40, info.hidden_dim)
    x[:20] = 0  # experts 0 and 1 get 20 tokens each (above min_expert_tokens), all zero
    idx = torch.tensor([[0, 1]] * 20 + [[2, 3]] * 20)
    col = ExpertStatsCollector(info)
    col.observe(x, idx)
    gu = col.finalize("gate_up_proj")
    assert gu.fallback_experts[:2] == [0, 1] and "all-zero" in gu.event.notes[0]
    assert torch.allclose(gu.hessian[0], col.layer_hessian()) and gu.hessian[0].diagonal().sum() > 0
    dn = col.finalize("down_proj")
    assert dn.fallback_experts[:2] == [0, 1] and "identity" in dn.event.notes[0]
    assert torch.linalg.cholesky_ex(dn.hessian[0]).info == 0


@dataclass
class FussyConfig(tm.SignBinaryConfig):
    """Refuses Hessians without a Cholesky factor, as a GPTQ-style method without damping would."""

    def quantize_experts(self, W3d, H3d, *, context=None):
        if bool(torch.linalg.cholesky_ex(H3d).info.any()):
            raise ValueError("Hessian is not positive definite even with damping")
        return super().quantize_experts(W3d, H3d, context=context)


@dataclass
class NeverDefiniteConfig(tm.SignBinaryConfig):
    def quantize_experts(self, W3d, H3d, *, context=None):
        from torchao_mobie.algorithms.compensation import inverse_hessian_factor

        inverse_hessian_factor(-torch.eye(W3d.shape[-1]))  # raises: not positive definite even with damping


def test_singular_hessian_falls_back_with_a_log(model, caplog):
    data = torch.full((4, 32), 7, dtype=torch.long)  # one token everywhere: every Hessian has rank 1
    with caplog.at_level(logging.WARNING, logger="torchao_mobie"):
        report = tm.quantize_model(model, FussyConfig(), data, progress=False)
    assert len(report.parameters) == 4
    lines = [r.getMessage() for r in caplog.records if "not positive definite" in r.getMessage()]
    assert lines and "model.layers.0.mlp.experts.gate_up_proj" in lines[0] and "mean(diag H)" in lines[0]
    for e in (model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts):
        assert torch.isfinite(e.gate_up_proj).all() and torch.isfinite(e.down_proj).all()


def test_hessian_not_positive_definite_after_damping_raises(model):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: NeverDefiniteConfig cannot "
                                         r"binarize this parameter: its calibration Hessian is not positive definite"):
        tm.quantize_model(model, NeverDefiniteConfig(), calib(), progress=False)
    assert_unchanged(model, snap)  # failed on the first parameter


# ---- already quantized, mixed configs ---------------------------------------------------------------------


def test_packed_checkpoint_cannot_be_quantized_again(mobie_checkpoint):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(mobie_checkpoint)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj holds packed 1-bit MoBiE "
                                           r"weights .* already quantized"):
        tm.quantize_model(m, tm.BiLLMConfig(), calib(), progress=False)
    with pytest.raises(RuntimeError, match="already quantized"):
        tm.quantize_(m, tm.BiLLMConfig())


def test_reloaded_fake_quant_checkpoint_cannot_be_quantized_again(model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tm.quantize_model(model, tm.SignBinaryConfig(), calib(), progress=False)
    model.save_pretrained(tmp_path / "fq")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "fq")  # records are gone, config.json remembers
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"already quantized: its config has torchao_mobie=.*SignBinaryConfig"):
        tm.quantize_model(m, tm.BiLLMConfig(), calib(), progress=False)
    with pytest.raises(RuntimeError, match="already quantized"):
        tm.quantize_(m, tm.BiLLMConfig(step="observe"))
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
    # a different scope (attention) of the same checkpoint is still allowed by the marker
    tm.quantize_(m, tm.SignBinaryConfig(scope=["attention"]))

    err = cli_error(capsys, quantize_argv(tmp_path / "again", model=tmp_path / "fq"))
    assert "is already quantized (config.json has torchao_mobie=" in err


def test_observe_and_convert_with_different_configs(model):
    snap = snapshot(model)
    tm.quantize_(model, tm.BiLLMConfig(step="observe"))
    with torch.no_grad():
        model(calib())
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj was observed with BiLLMConfig but step='convert' got "
                                         r"ARBLLMConfig \(BiLLMConfig vs ARBLLMConfig\)"):
        tm.quantize_(model, tm.ARBLLMConfig())
    with pytest.raises(ValueError, match=r"percdamp=0\.01 vs 0\.05"):
        tm.quantize_(model, tm.BiLLMConfig(percdamp=0.05))
    from torchao.quantization import quantize_ as ao_quantize_  # the torchao handler checks too

    with pytest.raises(ValueError, match="was observed with BiLLMConfig"):
        ao_quantize_(model, tm.ARBLLMConfig(), filter_fn=tm.moe_experts_filter)
    assert_unchanged(model, snap)
    tm.quantize_(model, tm.BiLLMConfig())  # the matching config converts
    assert len(tm.QuantizationReport.from_model(model).parameters) == 4


def test_quantize_model_on_observed_model(model):
    tm.quantize_(model, replace(tm.BiLLMConfig(), step="observe"))
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="has observers from step='observe'"):
        tm.quantize_model(model, tm.BiLLMConfig(), calib(), progress=False)
    assert_unchanged(model, snap)


# ---- command line -----------------------------------------------------------------------------------------


def test_cli_refuses_non_empty_out_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(capsys, quantize_argv(out))
    assert f"--out {out}: directory exists and is not empty; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_refuses_out_inside_the_input_model(tmp_path, capsys):
    src = tmp_path / "model"
    shutil.copytree(tm.zoo.zoo_path("micro-qwen3moe"), src)
    err = cli_error(capsys, quantize_argv(src / "q", model=src))
    assert "is the input model directory or inside it" in err
    err = cli_error(capsys, quantize_argv(tmp_path, model=src, *["--force"]))
    assert "contains the input model directory" in err
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in tm.zoo.zoo_path("micro-qwen3moe").iterdir())


@pytest.mark.parametrize("flag,value,match", [
    ("--nsamples", "0", "argument --nsamples: expected a positive integer, got '0'"),
    ("--nsamples", "-3", "argument --nsamples: expected a positive integer, got '-3'"),
    ("--seqlen", "0", "argument --seqlen: expected a positive integer, got '0'"),
    ("--seqlen", "1024", "--seqlen 1024 is longer than the context of --model micro-qwen3moe "
                         "(config.max_position_embeddings=512)"),
    ("--method", "gptq", "argument --method: invalid choice: 'gptq'"),
])
def test_cli_bad_numbers_and_choices(tmp_path, capsys, flag, value, match):
    argv = quantize_argv(tmp_path / "out")
    argv[argv.index(flag) + 1] = value
    assert match in cli_error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_cli_data_dir_missing_not_a_dir_or_without_corpora(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline here: skip the hub's retries (~25 s)
    err = cli_error(capsys, quantize_argv(tmp_path / "out", "--data-dir", str(tmp_path / "nope")))
    assert f"--data-dir {tmp_path / 'nope'}: no such directory" in err
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in cli_error(capsys, quantize_argv(tmp_path / "out", "--data-dir",
                                                                     str(tmp_path / "file")))
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, quantize_argv(tmp_path / "out", "--data-dir", str(tmp_path / "empty")))
    assert "could not find wikitext2/train" in err and str(tmp_path / "empty" / "wikitext-2-raw") in err
    err = cli_error(capsys, ["eval", "--model", "micro-qwen3moe", "--data-dir", str(tmp_path / "nope")])
    assert "no such directory" in err
    with monkeypatch.context() as m:  # unreadable: root ignores permissions, so simulate what os.access reports
        m.setattr("torchao_mobie.cli.common.os.access", lambda *a, **k: False)
        err = cli_error(capsys, quantize_argv(tmp_path / "out", "--data-dir", str(tmp_path / "empty")))
    assert f"--data-dir {tmp_path / 'empty'}: directory is not readable" in err
    assert not (tmp_path / "out").exists()


def test_cli_calibration_file_missing_empty_or_too_short(tmp_path, capsys):
    err = cli_error(capsys, quantize_argv(tmp_path / "out", "--calib", str(tmp_path / "missing.txt")))
    assert "--calib " + str(tmp_path / "missing.txt") + ": not a known corpus (wikitext2, ptb, c4) and no such file" \
        in err
    (tmp_path / "empty.txt").write_text("  \n")
    assert "the file is empty" in cli_error(capsys, quantize_argv(tmp_path / "out", "--calib",
                                                                    str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("A short text of a few tokens.")
    err = cli_error(capsys, quantize_argv(tmp_path / "out", "--calib", str(tmp_path / "short.txt")))
    assert "fewer than seqlen+1=65; use a longer text or a smaller --seqlen" in err
    assert not (tmp_path / "out").exists()


def test_cli_model_missing_or_not_a_checkpoint(tmp_path, capsys):
    err = cli_error(capsys, quantize_argv(tmp_path / "out", model=tmp_path / "nope"))
    assert f"--model {tmp_path / 'nope'}: no such directory, and not a zoo model name" in err
    (tmp_path / "empty").mkdir()
    assert "no config.json in this directory" in cli_error(capsys, quantize_argv(tmp_path / "out",
                                                                                 model=tmp_path / "empty"))
    err = cli_error(capsys, ["eval", "--model", str(tmp_path / "nope")])
    assert "no such directory" in err


def test_cli_dense_checkpoint_is_not_a_moe(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    err = cli_error(capsys, quantize_argv(tmp_path / "out", model=tmp_path / "dense"))
    assert f"--model {tmp_path / 'dense'}: Qwen3ForCausalLM has no MoE experts module" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def broken_copy(mobie_checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(mobie_checkpoint, d)
    return d


def _flip_byte(path, key):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    pos = 8 + n + header[key]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))


def test_cli_eval_on_corrupted_checkpoint(broken_copy, capsys):
    key = "model.layers.1.mlp.experts._down_proj_qdata"
    _flip_byte(broken_copy / "model.safetensors", key)
    err = cli_error(capsys, ["eval", "--model", str(broken_copy), "--windows", "1"])
    assert f"error: --model {broken_copy}: " in err and key in err and "corrupted (checksum mismatch)" in err
    with pytest.raises(CLIError, match=key) as e:  # -v: raised, so the traceback (and its cause) shows
        main(["eval", "-v", "--model", str(broken_copy), "--windows", "1"])
    assert isinstance(e.value.__cause__, tm.storage.MoBiECheckpointError)


def test_cli_eval_and_bench_on_truncated_checkpoint(broken_copy, capsys):
    f = broken_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    for command in ("eval", "bench"):
        err = cli_error(capsys, [command, "--model", str(broken_copy)])
        assert "truncated" in err and "model.safetensors" in err


def test_cli_eval_on_incompatible_format_version(broken_copy, capsys):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, ["eval", "--model", str(broken_copy), "--windows", "1"])
    assert "format version 99 is not supported" in err
