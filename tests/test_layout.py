"""The package's layout: no import cycle among its modules' module-level imports.

A module's module-level imports (those run when it is imported; not function-local ones and not those
under `if TYPE_CHECKING:`) are read with `ast`, never by importing it, and resolved to workbench modules:
`from workbench import tracking` is an edge to workbench.tracking, `from workbench.devices import
get_device` one to workbench.devices. A cycle among these edges means one of its modules can only be
imported half-initialised, depending on which the caller imports first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import workbench

PACKAGE_ROOT = Path(workbench.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root` (packages as their __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(statements: list[ast.stmt]):
    """Import statements run at import time: top level, and inside top-level if/try blocks (not TYPE_CHECKING)."""
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level_imports(block)


def import_graph(modules: dict[str, Path], package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name and (t == package or t.startswith(package + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    modules = module_files(PACKAGE_ROOT, "workbench")
    assert "workbench.finetune" in modules and "workbench.train.tuning" in modules, sorted(modules)
    graph = import_graph(modules, "workbench")
    assert sum(len(targets) for targets in graph.values()) > 50, "the graph lost its edges: the parser is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle_and_ignores_type_checking_and_local_imports(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text("from ..c import thing\n")
    (root / "c.py").write_text("import pkg.a\nthing = 1\n")
    graph = import_graph(module_files(root, "pkg"), "pkg")
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]

    (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
                               "def f():\n    import pkg.a\nthing = 1\n")
    graph = import_graph(module_files(root, "pkg"), "pkg")
    assert graph["pkg.c"] == set() and find_cycle(graph) is None
