"""The import layering of DESIGN.md, computed from the code: no upward imports, no import cycles.

Every `import` and `from ... import` of every module counts, lazy ones inside functions included (a lazy
import is still a dependency: it only moves the failure to run time), and so do constant module names given
to `importlib.import_module`. Each folder's `__init__.py` docstring states what the folder must not import;
it is checked against the same table, so the docs cannot drift from the rule.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "moelink"
FOLDERS = ("engine", "planner", "scheduler", "moe", "comm", "kernels", "benchmarks")

# Layer units, top to bottom, and what each may import besides itself. engine/server is a unit of its own:
# the engine core serves the offline API too and must not depend on the gRPC front.
ALLOWED: dict[str, frozenset[str]] = {
    "benchmarks": frozenset({"engine.server", "engine", "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine.server": frozenset({"engine", "planner", "scheduler", "moe", "comm", "kernels"}),
    "engine": frozenset({"planner", "scheduler", "moe", "comm", "kernels"}),
    "planner": frozenset({"comm"}),  # the cluster model prices links with comm.link_model
    "scheduler": frozenset(),
    "moe": frozenset({"comm", "kernels"}),
    "comm": frozenset({"kernels"}),
    "kernels": frozenset(),
}
# The `moelink` command is the composition root: it alone in engine/ may register the server's subcommands.
COMPOSITION_ROOTS: dict[str, frozenset[str]] = {"engine.cli": frozenset({"engine.server"})}
# scheduler/ is pure Python (DESIGN.md): standard library only, so it is unit-tested on plain lists.
STDLIB_ONLY = ("scheduler",)


@dataclass
class ImportGraph:
    files: dict[str, Path]  # module name (without "moelink.") -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> modules of this package it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level outside packages
    where: dict[tuple[str, str], int] = field(default_factory=dict)  # (module, imported) -> first line


def _module_files() -> dict[str, Path]:
    files = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _imported_names(module: str, path: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute dotted names imported by one module (without resolving which of them are modules)."""
    is_package = path.name == "__init__.py"
    names = []
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
        edges, external = set(), set()
        tree = ast.parse(path.read_text(), str(path))
        names = _imported_names(module, path, tree)
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
                edges.add(target)
                graph.where.setdefault((module, target), abs(line))
        graph.edges[module] = edges
        graph.external[module] = external
    return graph


def unit_of(module: str) -> str:
    return max((u for u in ALLOWED if module == u or module.startswith(u + ".")), key=len)


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


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


def test_graph_sees_every_folder_and_lazy_imports(graph):
    # The checker itself: it must find modules in every folder and count imports inside functions.
    assert {unit_of(m).split(".")[0] for m in graph.files} == set(FOLDERS)
    assert "engine.ray_guard" in graph.edges["engine.ray_executor"]  # `from . import ray_guard` in a method
    assert "engine.server.cli" in graph.edges["engine.cli"]  # `from .server import cli` in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_imports(graph):
    bad = []
    for module, targets in sorted(graph.edges.items()):
        unit = unit_of(module)
        allowed = ALLOWED[unit] | COMPOSITION_ROOTS.get(module, frozenset())
        for target in sorted(targets):
            target_unit = unit_of(target)
            if target_unit != unit and target_unit not in allowed:
                line = graph.where[(module, target)]
                bad.append(f"{graph.files[module].relative_to(ROOT)}:{line}: {unit} imports {target} ({target_unit})")
    assert not bad, "imports against the layering (tests/test_layering.py ALLOWED):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph.edges)
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_pure_python_folders_import_only_the_standard_library(graph):
    bad = {m: sorted(ext - set(sys.stdlib_module_names) - {"__future__"})
           for m, ext in graph.external.items() if unit_of(m) in STDLIB_ONLY}
    assert not {m: e for m, e in bad.items() if e}, bad


_MUST_NOT = re.compile(r"^Must not import:\s*(.+?)\.?\s*$", re.M)


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_folder_docstring_states_what_it_must_not_import(unit):
    """Each layer's `__init__.py` opens with what it owns and a line `Must not import: a, b.` (`nothing` for
    the top) naming exactly the units the table forbids it."""
    path = ROOT / unit.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    match = _MUST_NOT.search(doc)
    assert match, f"{path.relative_to(ROOT)}: the docstring needs a line 'Must not import: ...'"
    text = re.sub(r"\(.*?\)", "", match.group(1))  # a parenthesis may say why
    stated = {name.strip(" `/").replace("/", ".") for name in text.split(",")} - {"nothing"}
    forbidden = set(ALLOWED) - ALLOWED[unit] - {unit}
    assert stated == forbidden, f"{path.relative_to(ROOT)} says {sorted(stated)}, the layering says {sorted(forbidden)}"
