"""The modules of gateway/ import each other without a cycle.

Every import counts: at the top, inside functions (lazy imports), and under
``if TYPE_CHECKING:``. A lazy or type-only import hides a cycle from the interpreter but not
from the design: the modules still cannot be understood, tested or replaced one without the
other (issue #12's cycle of eight modules ran through ``TYPE_CHECKING`` imports of `Gateway`
and lazy imports of the admin helpers). ``from gateway.x import y`` depends on module
``gateway.x.y`` when that is a module, else on ``gateway.x``; importing a package runs its
``__init__``, so a submodule that imports its own package counts as an edge to it.

`ALLOWED` would list edges known to close a cycle, each with its owner and way out; it is
empty and may only shrink (an entry that no longer exists fails the test too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

ROOT = Path(gateway.__file__).parent

ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("gateway"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base == "gateway" or base.startswith("gateway."):
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        deps.add(full if full in files else owner(base))
        deps.discard(None)
        deps.discard(name)
        graph[name] = {d for d in deps if d is not None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "gateway.admin.app" in graph["gateway.app"]  # top level
    assert "gateway.cluster.workers" in graph["gateway.serve"]  # under TYPE_CHECKING
    assert "gateway.upstream.fastpool" in graph["gateway.upstream"]  # inside a function


def test_no_import_cycle_in_gateway() -> None:
    graph = import_graph()
    for edge in ALLOWED:
        assert edge[1] in graph[edge[0]], f"{edge} is gone: remove it from ALLOWED"
        graph[edge[0]].discard(edge[1])
    assert cycles(graph) == [], "import cycle (every import counts, see the module docstring)"


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_components_and_admin_do_not_import_the_app() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("gateway.admin", "gateway.rollout", "gateway.shadow",
                            "gateway.monitoring")):
            assert "gateway.app" not in deps, name
