"""Binarization methods: the interface every config implements (:mod:`.base`), MoBiE's per-projection
logic (:mod:`.mobie`) and the names the command line and benchmarks use for them (:mod:`.registry`).
Import submodules directly."""
