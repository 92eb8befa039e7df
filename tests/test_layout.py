"""The shape of the code base (docs/layout.md): no import circle between the project's modules, no source file
over 600 lines and no function over 100 lines outside tests/. Read from the files themselves with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("data", "engine", "model", "tools")


def source_files() -> list[Path]:
    files = [ROOT / "train.py", ROOT / "predict.py"]
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).glob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions (deferred imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import submodule` depends on the submodule, not the package
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in source_files()}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_cycle_finder_on_a_known_graph():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_the_projects_modules():
    graph = import_graph()
    assert {"train", "predict", "engine.rundir", "tools.sweep"} <= set(graph)  # the scan sees the project
    assert "engine.rundir" in graph["train"]
    assert cycles(graph) == []


def test_no_source_file_over_600_lines_and_no_function_over_100():
    long_files = [f"{p.relative_to(ROOT)} ({n})" for p in source_files() if (n := len(p.read_text().splitlines())) > 600]
    long_functions = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert long_files == [] and long_functions == []


def test_docs_layout_names_every_source_file():
    """docs/layout.md maps each file to its job: a new module gets its line there."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    unnamed = [str(p.relative_to(ROOT)) for p in source_files() if p.name != "__init__.py" and p.name not in layout]
    assert unnamed == []


def test_no_module_imports_another_modules_private_names():
    """A helper used by two files is public (issue 21): `from x import _name` across project files is refused."""
    modules = {module_name(p) for p in source_files()}
    private = [f"{p.relative_to(ROOT)}: from {node.module} import {alias.name}"
               for p in source_files() for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.ImportFrom) and node.module in modules
               for alias in node.names if alias.name.startswith("_")]
    assert private == []
