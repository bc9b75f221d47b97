"""The package's import graph: no circle, and the stages talk through artifacts (evaluate/ and explain/ never
import the training pipeline). Read from the source with ``ast`` (module-level and in-function imports alike)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ecgfm"
TRAINING = ("ecgfm.pipelines", "ecgfm.train", "ecgfm.methods", "ecgfm.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """ecgfm modules ``name`` imports (``from ecgfm.a import b`` counts ``ecgfm.a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("ecgfm") and t != name and t != "ecgfm":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_import_graph_has_no_circle():
    graph = _graph()
    # a package __init__ that re-exports its modules is not a circle by itself: leave package -> own child edges out
    trimmed = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    assert _cycles(trimmed) == []


def test_evaluate_and_explain_do_not_import_the_training_pipeline():
    graph = _graph()
    bad = {m: sorted(t for t in ts if t.startswith(TRAINING)) for m, ts in graph.items()
           if m.startswith(("ecgfm.evaluate", "ecgfm.explain", "ecgfm.api", "ecgfm.artifacts", "ecgfm.zoo"))}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_the_graph_reader_sees_real_edges():
    """The checks above cannot pass vacuously: known edges are found."""
    graph = _graph()
    assert "ecgfm.artifacts" in graph["ecgfm.api"]
    assert "ecgfm.data.preprocess" in graph["ecgfm.api"]
    assert len(graph) > 40
