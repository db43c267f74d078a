"""The package's shape (issue 13): no import cycle among its modules, counting the imports
inside functions, so that every layer can be read, and imported, on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import mbf_kernels

PACKAGE = Path(mbf_kernels.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its text (a compiled submodule
    such as ``_C`` counts as a module; a parent package, which Python imports first anyway,
    does not count as an edge)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files) | {"mbf_kernels._C"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                stem = ".".join(base[:len(base) - node.level + 1] +
                                ([node.module] if node.module else []))
                subs = {f"{stem}.{a.name}" for a in node.names} & known
                targets |= subs or {stem}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("mbf_kernels")}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                targets.add(node.args[0].value)
        graph[name] = {t for t in targets & known
                       if t != name and not name.startswith(t + ".") and t != "mbf_kernels"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for t in sorted(graph.get(node, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "mbf_kernels.layout" in graph and graph["mbf_kernels.compact"]  # the walk saw them
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_layout_and_limits_are_leaves():
    graph = import_graph()
    assert graph["mbf_kernels.layout"] <= {"mbf_kernels.packed"}
    assert graph["mbf_kernels.limits"] == set()


def test_the_library_never_imports_the_apps():
    """mbf_kernels.apps (the command line, training, benchmark, profiling, data, models) sits
    above the library: nothing outside it imports it, so the ops and the optimizer load alone."""
    graph = import_graph()
    apps = {m for m in graph if m == "mbf_kernels.apps" or m.startswith("mbf_kernels.apps.")}
    assert "mbf_kernels.apps.cli" in apps
    offenders = {m: graph[m] & apps for m in graph if m not in apps and graph[m] & apps}
    assert not offenders, offenders


def test_no_module_over_500_lines_and_no_function_over_80():
    """Issue 13's bar: every file of the package can be read whole, every function at once."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 500:
            too_long.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(PACKAGE)}: {node.name}() {length} lines")
    assert not too_long, too_long
