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
