"""The package's structure: no import cycles (module-level and function-local imports alike), the
CLI is the only module that knows argparse, the public door lists what it exports."""

from __future__ import annotations

import ast
from pathlib import Path

import ct_transfer

SRC = Path(ct_transfer.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target or ""


def import_graph() -> dict[str, set[str]]:
    """Edges A -> B for every import of a ct_transfer module B anywhere in A (functions too).
    Importing a.b.c also runs the sub-package a.b's __init__ (an edge to it); the root package,
    the public door that re-exports everything, is left out."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:  # `from .data import load_subset` -> ct_transfer.data
                    t = t.rpartition(".")[0]
                if not t or t == "ct_transfer" or t == name or name.startswith(t + "."):
                    continue  # a module's own parent package is already being imported
                graph[name].add(t)
                parent = t.rpartition(".")[0]
                while parent and parent != "ct_transfer":  # the sub-package's __init__ runs first
                    if parent != name and not name.startswith(parent + "."):
                        graph[name].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "ct_transfer.run" in graph["ct_transfer.engine.loop"]  # the checker sees edges
    assert cycles(graph) == []


def test_the_cycle_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_knows_argparse():
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "argparse" in p.read_text(encoding="utf-8")]
    assert users == ["cli.py"]


def test_library_code_does_not_print():
    offenders = []
    for p in SRC.rglob("*.py"):
        if p.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{p.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


def test_public_door():
    for name in ct_transfer.__all__:
        assert hasattr(ct_transfer, name), name
    assert {"fit", "TrainConfig", "Run", "load_run", "create_model"} <= set(ct_transfer.__all__)
