"""Integrations with other libraries (transformers model layouts, lm-eval). Import submodules directly."""
