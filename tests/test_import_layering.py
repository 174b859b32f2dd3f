"""No import cycle between the top-level units of `optimum_sparse/` (issue 20), lazy imports inside functions included.

Every module is parsed with `ast`; each `import`/`from ... import` anywhere in the file (module level, functions,
`TYPE_CHECKING` blocks excluded) is mapped to the unit it lands in (`config`, `pruner`, `engine`, `methods`, ...).
A cycle in that graph fails the test and is named.
"""

import ast
import os
from collections import defaultdict

import pytest

PACKAGE = "optimum_sparse"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _unit(module: str):
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """Absolute names of every module imported in `tree` (relative imports resolved), skipping TYPE_CHECKING blocks."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            # `from optimum_sparse import engine` imports the unit itself
            if target == PACKAGE:
                found.extend(f"{PACKAGE}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def unit_graph():
    """{unit: {imported unit: [importing module, ...]}} over the package source."""
    graph = defaultdict(lambda: defaultdict(list))
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            is_package = rel.endswith(".__init__")
            module = rel[: -len(".__init__")] if is_package else rel
            source_unit = _unit(module)
            if source_unit is None:  # optimum_sparse/__init__.py re-exports everything; it is the top, not a unit
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
            for target in _imports(tree, module, is_package):
                target_unit = _unit(target)
                if target_unit and target_unit != source_unit:
                    graph[source_unit][target_unit].append(module)
    return graph


def find_cycles(graph):
    """Strongly connected components with more than one unit (Tarjan), each sorted."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
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
                result.append(sorted(component))

    for v in sorted(set(graph) | {w for edges in graph.values() for w in edges}):
        if v not in index:
            strong(v)
    return result


def describe(graph, component):
    members = set(component)
    lines = []
    for a in component:
        for b, modules in sorted(graph[a].items()):
            if b in members:
                lines.append(f"  {a} -> {b} (in {', '.join(sorted(set(modules))[:3])})")
    return "\n".join(lines)


def test_the_analyzer_sees_lazy_imports_and_cycles():
    tree = ast.parse("def f():\n    from ..methods import x\n")
    assert _imports(tree, "optimum_sparse.engine.block", False) == ["optimum_sparse.methods"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from optimum_sparse.pruner import P\n")
    assert _imports(tree, "optimum_sparse.config", False) == ["typing"]
    assert find_cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": []}, "b": {}}) == []


def test_no_import_cycle_between_units():
    graph = unit_graph()
    assert {"config", "engine", "methods", "pruner"} <= set(graph), "the analyzer found no imports: wrong root?"
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail("import cycles between units of optimum_sparse:\n" + "\n".join(
            f"{' <-> '.join(c)}:\n{describe(graph, c)}" for c in cycles))
