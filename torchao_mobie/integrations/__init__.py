"""Integrations with other libraries: transformers model layouts (:mod:`.transformers`), the ``"mobie"`` experts
implementation (:mod:`.experts`), lm-eval (:mod:`.lm_eval`). Import submodules directly."""
