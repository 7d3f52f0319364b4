import logging
import os

# Triton kernels run in the interpreter on CPU (CI has no GPU); must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(1)  # small ops: threads only add spin-wait overhead on 2 shared cores
logging.getLogger("torchao").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def micro():
    """The committed micro zoo model (fp32) and its tokenizer."""
    from torchao_mobie.zoo import load_zoo_model

    return load_zoo_model("micro-qwen3moe")


@pytest.fixture(scope="session")
def mobie_checkpoint(tmp_path_factory):
    """A packed MoBiE checkpoint of the micro model written by ``torchao-mobie quantize`` (4 x 64 WikiText-2
    calibration tokens). Shared: copy it before changing anything in it."""
    from torchao_mobie.cli import main

    out = tmp_path_factory.mktemp("cli") / "micro-mobie"
    main(["quantize", "--model", "micro-qwen3moe", "--method", "mobie", "--out", str(out), "--nsamples", "4",
          "--seqlen", "64", "--device", "cpu"])
    return out


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory):
    """A small UTF-8 text file (about 10k tokens of WikiText-2 test) for fast ``--calib FILE`` runs."""
    from torchao_mobie.data import load_text

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(load_text("wikitext2", "test")[:40_000], encoding="utf-8")
    return p
