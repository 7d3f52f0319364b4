"""Package layout rules: no import cycle inside torchao_mobie, no module over 500 lines.

The import graph is read from the source with ``ast`` (module-level and function-local imports alike, only
``if TYPE_CHECKING:`` blocks are skipped): importing ``a.b.c`` from a module outside ``a.b`` also runs
``a.b``'s ``__init__``, so it is an edge to that package too. A cycle makes what a module sees depend on
which module was imported first; the rule keeps the layers in one order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "torchao_mobie"
ROOT = Path(__file__).resolve().parents[1] / PKG
MAX_LINES = 500


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_names(path: Path, name: str, modules) -> set[str]:
    """Modules of this package that importing ``name`` (the module at ``path``) may import, directly."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub``; any other name needs ``pkg`` itself
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        else:
            continue
        for t in targets:
            if t != PKG and not t.startswith(PKG + "."):
                continue
            while t not in modules and "." in t:  # an attribute of a module, not a module
                t = t.rsplit(".", 1)[0]
            out.add(t)
            # the packages above ``t`` run too, except those the importer is already inside
            parts = t.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if not (name == pkg or name.startswith(pkg + ".")):
                    out.add(pkg)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_names(path, name, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """(one cycle per strongly connected component with more than one module, those components) (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in comps], comps


def _cycle_in(graph, comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (for the message)."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_no_import_cycles():
    cycles, comps = find_cycles(import_graph())
    assert not cycles, "import cycles inside torchao_mobie:\n" + "\n".join(
        f"{' -> '.join(c)}   (modules in a cycle with it: {', '.join(m)})" for c, m in zip(cycles, comps))


def test_cycle_finder_sees_function_local_and_package_imports(tmp_path):
    """The rule itself: a function-local import closes a cycle, and so does a package ``__init__``."""
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "sub" / "__init__.py").write_text("from ..c import h\n")
    (pkg / "sub" / "x.py").write_text("")
    (pkg / "c.py").write_text("def h():\n    from .sub.x import y\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import z\n")
    (pkg / "e.py").write_text("from .d import w\n")
    global ROOT
    old, ROOT = ROOT, pkg
    try:
        cycles = {tuple(sorted(set(c))) for c in find_cycles(import_graph())[0]}
    finally:
        ROOT = old
    assert cycles == {(f"{PKG}.a", f"{PKG}.b"), (f"{PKG}.c", f"{PKG}.sub")}


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_module_size(name):
    n = len(package_modules()[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (at most {MAX_LINES}): split it by concern"
