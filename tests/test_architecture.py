"""The package's import structure (issue 17): no import circles, and the layers point one way.

Every ``import`` / ``from … import`` of every module under ``pipeline/`` counts, also those inside
functions (a local import hides a circle from Python, not from a reader).  Package layers, lowest
first: the shared base (``requests``, ``tokens``, ``data``, ``config``, ``models``, ``corpus``,
``distributed``: they may use each other), then ``evaluation``, then ``editing``, ``ledger`` and
``report``, then ``probes`` (which hook into the editor's reads), ``artifacts`` and ``export``
(which rebuilds ledger states), then ``stages``, then the CLI, then ``python -m pipeline``.  The
ledger stores what the editor computes but never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the pipeline modules it imports (``from pipeline.x import y`` counts ``pipeline.x.y``
    when that is a module, else ``pipeline.x``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LAYER = {"requests": 0, "tokens": 0, "data": 0, "config": 0, "models": 0, "corpus": 0, "distributed": 0,
         "evaluation": 1, "editing": 2, "ledger": 2, "report": 2, "probes": 3, "artifacts": 3, "export": 3, "stages": 4,
         "cli": 5, "__main__": 6}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the top-level pipeline/__init__ (the public API)


def test_packages_import_only_downwards():
    wrong = []
    for mod, deps in import_graph().items():
        here = _package(mod)
        if here is None:
            continue
        for dep in deps:
            there = _package(dep)
            if there is not None and there != here and LAYER[there] >= max(LAYER[here], 1):
                wrong.append(f"{mod} → {dep}")
    assert wrong == []


def test_the_ledger_does_not_know_the_editor():
    graph = import_graph()
    assert not [(m, d) for m, ds in graph.items() if m.startswith("pipeline.ledger") for d in ds
                if d.startswith(("pipeline.editing", "pipeline.stages", "pipeline.evaluation"))]
