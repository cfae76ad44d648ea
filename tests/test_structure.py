"""The package's structure: no import cycles (module-level and function-local imports alike), the
CLI is the only module that knows argparse, the public door lists what it exports."""

from __future__ import annotations

import ast
import re
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


def _library_files():
    return [p for p in SRC.rglob("*.py") if p.name != "cli.py"]


def _strings(node) -> list[str]:
    """The literal text in an expression (f-strings' constant parts included)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flag_spellings(source: str) -> list[tuple[int, str]]:
    """CLI flags spelled in what library code raises or logs (only the CLI speaks in flags)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        exprs = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            exprs = [node.exc]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in LOG_CALLS:
            exprs = node.args
        for e in exprs:
            found += [(node.lineno, m) for text in _strings(e) for m in FLAG.findall(text)]
    return found


LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}


def test_library_messages_name_parameters_not_flags():
    offenders = [f"{p.relative_to(SRC)}:{line}: {flag}" for p in _library_files()
                 for line, flag in flag_spellings(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_flag_checker_finds_flags():
    assert flag_spellings('raise CTTransferError(f"{x}: give --data")\n') == [(1, "--data")]
    assert flag_spellings('log.warning("see --on-bad skip")\n') == [(1, "--on-bad")]
    assert flag_spellings('raise ConfigError("batch_size", 0, "must be >= 1")\n') == []


def global_side_effects(source: str) -> list[tuple[int, str]]:
    """Writes to os.environ, backend switches and global RNG seeding: process-wide side effects."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                    found.append((node.lineno, ast.unparse(t)))
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("os.putenv", "os.environ.update", "os.environ.setdefault", "os.environ.pop",
                        "matplotlib.use", "plt.switch_backend", "np.random.seed", "numpy.random.seed",
                        "random.seed", "torch.set_default_dtype", "torch.set_default_device"):
                found.append((node.lineno, name))
    return found


def test_no_process_wide_side_effects_in_the_library():
    offenders = [f"{p.relative_to(SRC)}:{line}: {what}" for p in _library_files()
                 for line, what in global_side_effects(p.read_text(encoding="utf-8"))]
    assert offenders == []
    assert global_side_effects('import os\nos.environ["HF_HUB_OFFLINE"] = "1"\n') == [(2, "os.environ['HF_HUB_OFFLINE']")]
    assert global_side_effects("matplotlib.use('Agg')\n") == [(1, "matplotlib.use")]


def test_one_place_turns_logits_into_probabilities():
    """softmax(logits / T), the TTA forward and the decision rule live in the inference core only
    (the export's graph calls the core's own ``calibrated`` and ``tta_logits``)."""
    offenders = []
    for p in _library_files():
        if p.name == "inference.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            scaled_softmax = name.split(".")[-1] == "softmax" and node.args and isinstance(node.args[0], ast.BinOp)
            if scaled_softmax or (name == "tta_logits" and p.name != "export.py"):
                offenders.append(f"{p.relative_to(SRC)}:{node.lineno}: {name}")
    assert offenders == []
