"""No import cycle inside src/lora_a2: every import counts — inside functions too, and a package
``__init__``'s own imports — except ``if TYPE_CHECKING:`` blocks (annotations only) and
importlib calls (plugin entry points)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "src"
PACKAGE = "lora_a2"


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix
                           for a in node.names]
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(graph[v]):
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


def test_the_detector_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40
    found = cycles(graph)
    detail = "; ".join(" ↔ ".join(c) + " (edges: " + ", ".join(
        f"{m} → {d}" for m in c for d in sorted(graph[m] & set(c))) + ")" for c in found)
    assert not found, detail


def test_config_is_a_leaf():
    """The config holds the schema, parsing and range checks, and imports no component."""
    graph = import_graph()
    parts = [m for m in graph if m == "lora_a2.config" or m.startswith("lora_a2.config.")]
    assert {"lora_a2.config", "lora_a2.config.schema"} <= set(parts)
    for m in parts:
        outside = {d for d in graph[m] if d not in parts}
        assert outside <= {"lora_a2.errors"}, f"{m} imports {sorted(outside)}"


#: the pure math both engines share (docs/DEVELOPMENT.md's layout): no I/O layer, no engine
PURE = ("selection", "aggregation", "lowrank", "budgets", "privacy", "secure_sum")
ENGINE_SIDE = ("lora_a2.engines", "lora_a2.runner", "lora_a2.launch", "lora_a2.cli",
               "lora_a2.reporters", "lora_a2.experiment", "lora_a2.rounds", "flwr", "ray")


def _everything_imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_the_pure_modules_reach_no_engine_even_indirectly():
    """Every module the pure ones import (transitively, inside functions too) is outside the
    engines, the round loop, the runner and Flower/Ray, so both engines can share them."""
    graph, mods = import_graph(), _modules()
    for pure in PURE:
        seen, todo = set(), [f"{PACKAGE}.{pure}"]
        assert todo[0] in graph, todo[0]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo.extend(graph[m])
        for m in seen:
            outside = {n for n in _everything_imported(mods[m]) if not n.startswith(".")}
            bad = [n for n in sorted(seen | outside)
                   if any(n == e or n.startswith(e + ".") for e in ENGINE_SIDE)]
            assert not bad, f"{pure} reaches {bad} (through {m})"
