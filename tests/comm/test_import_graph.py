"""comm's imports, read from the source: no module imports one that imports it back (lazy imports inside
functions count), and nothing in comm imports a layer above it (moe, engine, scheduler)."""
from __future__ import annotations

import ast
from pathlib import Path

import moelink.comm

COMM = Path(moelink.comm.__file__).parent
ABOVE = ("moelink.moe", "moelink.engine", "moelink.scheduler", "moelink.benchmarks")


def _module(path: Path) -> str:
    return "moelink.comm" if path.name == "__init__.py" else f"moelink.comm.{path.stem}"


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names, anywhere in the file; `from .x import y` names both
    x and x.y (y may be a submodule)."""
    package = ["moelink", "comm"]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to moelink.comm (every file here is a module of that package)
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_no_import_cycles_and_nothing_from_above():
    files = sorted(COMM.glob("*.py"))
    modules = {_module(p) for p in files}
    graph = {_module(p): {m for m in _imports(p) if m in modules and m != _module(p)} for p in files}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # The package __init__ re-exports its modules; Python imports a package before its submodules anyway,
    # so edges into "moelink.comm" itself are not module cycles.
    cycles = [(a, b) for a in graph for b in graph[a] if b != "moelink.comm" and a in reachable(b)]
    assert not cycles, f"import cycles in comm/: {cycles}"
    above = {(_module(p), m) for p in files for m in _imports(p) if m.startswith(ABOVE)}
    assert not above, f"comm/ imports from a layer above it: {sorted(above)}"
    assert "moelink.comm.a2a_base" in graph and not graph["moelink.comm.a2a_base"]
