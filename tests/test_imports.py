"""No import cycles inside `longserve` (module-level imports only: a function-level import runs after both
modules have loaded, so it cannot fail on a half-initialized module)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(body: list[ast.stmt]):
    """Import statements run at import time: top-level ones, also under `if`/`try` (not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                yield from _top_level(handler.body)


def import_graph(root: Path = SRC / "longserve", nested: bool = False) -> dict[str, set[str]]:
    """module -> the `longserve` modules it imports at module level (`nested`: in functions too)."""
    files = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text("utf-8"))
        imports = (
            [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
            if nested
            else _top_level(tree.body)
        )
        for node in imports:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(x for x in (base, node.module) if x)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_longserve_imports():
    graph = import_graph()
    assert "longserve.eval.specs" in graph["longserve.eval.cli"]
    assert "longserve.zoo" in graph["longserve.llm"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_eval_and_specprefill_have_no_cycles_even_through_lazy_imports():
    """The eval CLI <-> specprefill spec parser and synthetic <-> code_debug pairs once imported each
    other inside functions; the split keeps even those one-way."""
    graph = import_graph(nested=True)
    scope = {m for m in graph if m.startswith(("longserve.eval", "longserve.specprefill"))}
    assert find_cycle({m: graph[m] & scope for m in scope}) is None
