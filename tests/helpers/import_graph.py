"""The import graph of moelink's folders, read from the source with `ast` (nothing is imported).

Every `import` and `from ... import` counts, lazy ones inside functions included, and so do constant module
names given to `importlib.import_module`. Imports under `if TYPE_CHECKING:` (never run: they name a type for the
type checker) are kept apart, in `typing_edges`: tests/test_layering.py allows those to reach the seam protocols of
engine/contract from the configuration below it, and no further. Used by tests/test_layering.py (the layering rule and cycles) and
by tests that check one module's reach (e.g. engine_args must not load the model runner).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "moelink"
FOLDERS = ("engine", "planner", "scheduler", "moe", "comm", "kernels", "benchmarks")


@dataclass
class ImportGraph:
    files: dict[str, Path]  # module name (without "moelink.") -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> modules of this package it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level outside packages
    where: dict[tuple[str, str], int] = field(default_factory=dict)  # (module, imported) -> first line
    # module -> modules of this package it imports only under `if TYPE_CHECKING:` (for annotations, never run)
    typing_edges: dict[str, set[str]] = field(default_factory=dict)


def _module_files() -> dict[str, Path]:
    files = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _typing_only_lines(tree: ast.AST) -> set[int]:
    """The lines of the imports inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) blocks, not their `else`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imported_names(module: str, path: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute dotted names imported by one module (without resolving which of them are modules)."""
    is_package = path.name == "__init__.py"
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
                origin = f"{PACKAGE}.{origin}"
            else:
                origin = node.module or ""
            # `from pkg import name`: the module pkg.name when it is one, else pkg itself.
            names += [(f"{origin}.{alias.name}", node.lineno) for alias in node.names]
            names.append((origin, -node.lineno))  # negative: only if no name above was a module
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append((node.args[0].value, node.lineno))
    return names


def build_graph() -> ImportGraph:
    graph = ImportGraph(_module_files())
    for module, path in graph.files.items():
        edges, external, typing_only = set(), set(), set()
        tree = ast.parse(path.read_text(), str(path))
        names = _imported_names(module, path, tree)
        typing_lines = _typing_only_lines(tree)
        submodule_lines = set()
        for name, line in names:
            if line > 0 and name.startswith(PACKAGE + ".") and name[len(PACKAGE) + 1:] in graph.files:
                submodule_lines.add(line)
        for name, line in names:
            if not name.startswith(PACKAGE + ".") and name != PACKAGE:
                external.add(name.split(".")[0])
                continue
            target = name[len(PACKAGE) + 1:]
            if line < 0 and -line in submodule_lines:
                continue  # `from . import a_module`: the dependency is on the module, not on the package
            if target in graph.files and target != module:
                (typing_only if abs(line) in typing_lines else edges).add(target)
                graph.where.setdefault((module, target), abs(line))
        graph.edges[module] = edges
        graph.typing_edges[module] = typing_only - edges
        graph.external[module] = external
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def reachable(graph: ImportGraph, start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
