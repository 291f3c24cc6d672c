"""The package's import graph has no cycles (module-level and function-level imports alike).

Each module of `aggregator/` is parsed with `ast`; every ``import``/``from ... import`` of a
module of the package, wherever it stands, is an edge. A cycle means some module imports,
directly or not, a module that depends on it: the protocol or a helper belongs lower down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aggregator

PACKAGE = Path(aggregator.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = ["aggregator", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(name: str, path: Path, modules: dict) -> set[str]:
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in modules:  # a name imported from a module: the module
                c = c.rpartition(".")[0]
            if c and c != name and c != "aggregator":
                out.add(c)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _targets(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_graph_sees_relative_and_function_level_imports():
    g = import_graph()
    assert "aggregator.protocol" in g["aggregator.worker"]
    assert "aggregator.control" in g["aggregator.protocol"]


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_worker_variants_import_the_worker():
    """The protocol lives in protocol.py: nothing imports worker.py to learn it; only its
    subclass and the process entry point that picks between them import it."""
    importers = {m for m, targets in import_graph().items() if "aggregator.worker" in targets}
    assert importers == {"aggregator.task_worker", "aggregator.worker_process"}
