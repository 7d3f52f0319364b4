"""``python -m torchao_mobie.cli`` (and ``torchrun --nproc-per-node N -m torchao_mobie.cli quantize ...``)."""

import sys

from . import main

sys.exit(main())
