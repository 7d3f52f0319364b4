"""``torchao-mobie quantize / eval / bench`` in process on the micro zoo model (bad input: test_bad_input.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import torchao_mobie.storage as S
from torchao_mobie.cli import REPORT_NAME, main
from torchao_mobie.zoo import zoo_path

PNG = b"\x89PNG\r\n\x1a\n"


def _tree_digest(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("command,expected", [
    ("quantize", ["--method", "--calib", "--nsamples", "--seqlen", "--force", "fake-quant", "example:"]),
    ("eval", ["--reference", "--tasks", "--windows", "--plot-dir", "wikitext2_mc_local", "example:"]),
    ("bench", ["--prompt-len", "--new-tokens", "--plot", "throughput", "example:"]),
])
def test_help_of_every_command(command, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out, (command, word)


def test_quantize_mobie_saves_packed_checkpoint_that_reloads_and_generates(mobie_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = mobie_checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json", REPORT_NAME} <= {p.name for p in out.iterdir()}
    info = json.loads((out / REPORT_NAME).read_text())
    assert info["storage"] == "packed" and info["config"]["_type"] == "MoBiEConfig"
    assert info["calibration"] == {"source": "wikitext2/train", "nsamples": 4, "seqlen": 64, "seed": 0, "tokens": 256}
    assert info["bits"]["paper_bits"] >= 1.0 and info["bits"]["all_inclusive_bits"] > info["bits"]["paper_bits"]
    assert len(info["bits"]["per_parameter"]) == 4
    # packing is part of quantize_s (MoBiEConfig packs when it quantizes)
    assert {"load_s", "calibration_data_s", "quantize_s", "save_s", "total_s"} <= set(info["timing"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mobie"

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, S.MoBiETensor)
    prompt = tok(" The game began", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5


def test_quantize_baseline_is_fake_quant_and_leaves_the_input_untouched(calib_text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    before = _tree_digest(zoo_path("micro-qwen3moe"))
    out = tmp_path / "sign"
    main(["quantize", "--model", "micro-qwen3moe", "--method", "sign", "--calib", str(calib_text_file),
          "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--device", "cpu"])
    assert "fake-quant" in capsys.readouterr().out
    assert _tree_digest(zoo_path("micro-qwen3moe")) == before
    info = json.loads((out / REPORT_NAME).read_text())
    assert info["storage"] == "fake-quant" and info["calibration"]["source"] == str(calib_text_file.resolve())
    assert info["bits"]["paper_bits"] == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torchao_mobie"][0]["config"] == "SignBinaryConfig"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = model.model.layers[0].mlp.experts.down_proj[0, 0]
    assert len(torch.unique(w)) <= 2  # one row of one expert: alpha * sign + mean


def test_quantize_calibration_mix_of_a_corpus_and_a_file(calib_text_file, tmp_path, capsys):
    out = tmp_path / "mix"
    main(["quantize", "--model", "micro-qwen3moe", "--method", "sign", "--calib", f"ptb+{calib_text_file}",
          "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--device", "cpu"])
    info = json.loads((out / REPORT_NAME).read_text())
    assert info["calibration"]["source"] == f"ptb/train + {calib_text_file.resolve()}"
    assert info["calibration"]["tokens"] == 256
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", "micro-qwen3moe", "--method", "sign", "--calib", "ptb+nope.txt",
              "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    assert "--calib nope.txt: not a known corpus" in capsys.readouterr().err


def test_quantize_force_swaps_only_after_success(calib_text_file, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    argv = ["quantize", "--model", "micro-qwen3moe", "--method", "sign", "--calib", str(calib_text_file),
            "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--force", "--device", "cpu"]

    def failing_save(self, save_directory, **kw):
        (save_directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", failing_save)
        with pytest.raises(SystemExit) as e:
            main(argv)
    assert e.value.code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "previous result"

    main(argv)
    assert not (out / "old.txt").exists() and (out / REPORT_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_eval_against_reference_writes_json_and_plots(mobie_checkpoint, tmp_path, capsys):
    js, plots = tmp_path / "eval.json", tmp_path / "plots"
    res = main(["eval", "--model", str(mobie_checkpoint), "--reference", "micro-qwen3moe", "--tasks", "wikitext2,ptb",
                "--windows", "4", "--seqlen", "64", "--json", str(js), "--plot-dir", str(plots), "--device", "cpu"])
    assert res == 0
    out = capsys.readouterr().out
    assert "gap" in out and "topk_kept" in out and "wikitext2" in out and "ptb" in out
    data = json.loads(js.read_text())
    for corpus in ("wikitext2", "ptb"):
        row = data["perplexity"][corpus]
        assert row["ppl"] > 1 and row["ppl_ref"] > 1 and row["gap"] == pytest.approx(
            torch.tensor(row["ppl"]).log().item() - torch.tensor(row["ppl_ref"]).log().item(), abs=1e-4)
        assert row["kl"] >= 0 and 0 <= row["topk_kept"] <= 1 and row["tokens"] == 4 * 63
        layers = data["per_layer"][corpus]
        assert len(layers["topk_kept"]) == len(layers["top1_changed"]) == 2  # micro: 2 MoE layers
        assert (plots / f"expert_agreement_{corpus}.png").read_bytes()[:8] == PNG


def test_eval_perplexity_and_lm_eval_task_without_reference(mobie_checkpoint, tmp_path, capsys):
    js = tmp_path / "eval.json"
    main(["eval", "--model", str(mobie_checkpoint), "--tasks", "wikitext2,wikitext2_mc_local", "--windows", "2",
          "--seqlen", "64", "--limit", "8", "--json", str(js), "--plot-dir", str(tmp_path / "p"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "--reference micro-qwen3moe" in out  # hint: where the checkpoint came from
    assert "needs --reference" in out  # nothing to plot without a reference
    data = json.loads(js.read_text())
    assert data["perplexity"]["wikitext2"]["ppl"] > 1 and "gap" not in data["perplexity"]["wikitext2"]
    mc = data["lm_eval"]["model"]["wikitext2_mc_local"]
    assert 0 <= mc["acc"] <= 1 and mc["n_samples"] == 8


def test_bench_memory_components_speed_and_plot(mobie_checkpoint, tmp_path, capsys, monkeypatch):
    js, png = tmp_path / "bench.json", tmp_path / "memory.png"
    compiled = []  # compiling costs a minute here; that the compiled packed model is right is test_cpu_kernel's job
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    main(["bench", "--model", str(mobie_checkpoint), "--iters", "1", "--prompt-len", "16", "--new-tokens", "4",
          "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "tokens/s" in out
    assert "torch.compile: on (inductor; packed experts run torchao_mobie.kernels.cpu with " in out  # the CPU default
    data = json.loads(js.read_text())
    assert data["speed"]["compiled"] is True and len(compiled) == 1
    mem = data["memory"]
    assert sum(mem["components"].values()) == mem["model_bytes"]
    assert mem["packed_parameters"] == 4 and mem["experts_plain_bytes"] == 0
    assert mem["experts_sign_bytes"] > 0 and mem["experts_scale_bytes"] > 0
    assert mem["experts_bytes"] < 0.3 * mem["experts_bf16_bytes"]
    speed = data["speed"]
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["experts_implementation"] == "mobie" and speed["device"] == "cpu"
    assert "attention: sdpa -> mobie_sdpa" in out and speed["attn_implementation"] == "mobie_sdpa"  # CPU default
    assert png.read_bytes()[:8] == PNG


def test_demo_prints_table_and_writes_json_and_gap_vs_bits_plot(tmp_path, capsys):
    js, png = tmp_path / "demo.json", tmp_path / "demo.png"
    main(["demo", "--model", "micro-qwen3moe", "--methods", "sign", "billm", "--nsamples", "4", "--seqlen", "64",
          "--eval-windows", "4", "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "wikitext2_gap" in out and "billm" in out
    rows = json.loads(js.read_text())
    assert [r["method"] for r in rows] == ["sign", "billm"]
    assert rows[1]["wikitext2_gap"] < rows[0]["wikitext2_gap"]  # BiLLM beats the sign floor
    assert png.read_bytes()[:8] == PNG


def test_method_spec_sets_config_fields_and_names_bad_ones():
    from torchao_mobie.cli import make_config

    cfg = make_config("mobie:rounds=1,glas_samples=8,side=input")
    assert (cfg.rounds, cfg.glas_samples, cfg.side) == (1, 8, "input")
    assert make_config("billm").__class__.__name__ == "BiLLMConfig"
    assert make_config("hbllm:haar=col").haar == "col"
    for bad, says in (("mobie:nosuch=1", "nosuch"), ("mobie:rounds", "not key=value"), ("mobie:rounds=0", "rounds"),
                      ("nosuch:rounds=1", "not known")):
        with pytest.raises(SystemExit, match=says):
            make_config(bad)


@pytest.mark.parametrize("save_dtype,expect", [(None, torch.bfloat16), ("float32", torch.float32)])
def test_quantize_saves_unquantized_weights_in_the_source_dtype(calib_text_file, tmp_path, save_dtype, expect):
    """The zoo checkpoint is bf16 and is quantized in float32: embeddings, attention, norms and routers go
    back in bf16 unless asked otherwise; the packed experts keep their own storage."""
    from safetensors import safe_open

    out = tmp_path / "q"
    main(["quantize", "--model", "micro-qwen3moe", "--method", "mobie", "--calib", str(calib_text_file),
          "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--device", "cpu"]
         + ([] if save_dtype is None else ["--save-dtype", save_dtype]))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    plain = {k: v for k, v in dtypes.items() if "experts" not in k}
    assert plain and set(plain.values()) == {{torch.bfloat16: "BF16", torch.float32: "F32"}[expect]}
    assert any(v == "I32" for k, v in dtypes.items() if "experts" in k)  # packed sign planes
    info = json.loads((out / REPORT_NAME).read_text())
    assert info["dtype"] == str(expect).replace("torch.", "")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, S.MoBiETensor)
    assert model.model.embed_tokens.weight.dtype == expect
