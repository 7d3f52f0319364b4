"""Method names (as the command line, the demo and the benchmarks write them) and the configs they make.

``name:key=value,...`` sets config fields (values as Python literals, bare words as strings), e.g.
``mobie:rounds=1,glas_samples=8``; ``mobie-no-<part>`` is MoBiE with one component off (ablations).
"""

from __future__ import annotations

import ast

__all__ = ["QUANT_METHODS", "make_config", "method_table"]

#: every name ``torchao-mobie quantize --method`` takes
QUANT_METHODS = ("mobie", "billm", "arb", "arb-x", "arb-rc", "hbllm", "sign", "mobie-no-cejd", "mobie-no-glas",
                 "mobie-no-nges", "mobie-no-route_weighted")
_ABLATIONS = ("cejd", "glas", "nges", "route_weighted")


def method_table(**kw) -> dict:
    """``{name: () -> config}`` with ``kw`` set on every config."""
    from ..baselines import ARBLLMConfig, BiLLMConfig, HBLLMConfig, SignBinaryConfig
    from ..mobie import MoBiEConfig

    table = {
        "sign": lambda: SignBinaryConfig(**kw),
        "billm": lambda: BiLLMConfig(**kw),
        "arb": lambda: ARBLLMConfig(variant="arb", **kw),
        "arb-x": lambda: ARBLLMConfig(variant="x", **kw),
        "arb-rc": lambda: ARBLLMConfig(variant="rc", **kw),
        "hbllm": lambda: HBLLMConfig(**kw),
        "mobie": lambda: MoBiEConfig(**kw),
    }
    for part in _ABLATIONS:  # ablations: MoBiE with one component off
        table[f"mobie-no-{part}"] = lambda part=part: MoBiEConfig(**{part: False}, **kw)
    return table


def make_config(method: str, **kw):
    """The config of a method name, with ``name:key=value,...`` fields; a ValueError names what is wrong."""
    if ":" in method:
        method, _, spec = method.partition(":")
        for item in filter(None, spec.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method spec {item!r} in {method}:{spec} is not key=value")
            try:
                kw[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kw[key.strip()] = value.strip()  # a bare word: a string field (e.g. side=input)
    table = method_table(**kw)
    if method not in table:
        raise ValueError(f"--method {method!r} is not known; expected one of {sorted(table)}")
    try:
        return table[method]()
    except (TypeError, ValueError) as e:  # an unknown field name, or a value the config rejects
        raise ValueError(f"--method {method}: {e}") from None
