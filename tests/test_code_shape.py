"""The code's shape, read from its syntax (issue 77 item 5): no function of the package over 100 lines, and few
`Any` / `object` annotations where the contract and the blocks meet the rest of the engine.

- A function (or method, nested ones included) is counted from its `def` line to its last line: its docstring and
  comments count, its decorators do not. A function that long does several things; each part gets a name (a helper
  that says why) instead.
- An annotation at the seams (engine/contract/, engine/models/blocks/) that is, or holds, `Any` or `object`: each
  occurrence counts (a parameter, a return, an attribute or variable annotation; `dict[str, Any]` is one). An
  `Any` there is a boundary that says nothing about what crosses it; a Protocol, a TypeVar or a union does.

Read with `ast` only: nothing of the package is imported, so the check is cheap and runs without torch.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 100
SEAMS = ("engine/contract", "engine/models/blocks")
MAX_SEAM_ANY = 5
GENERATED = ("engine/server/gen",)  # protoc's output: not written here


def _package_folders() -> list[str]:
    """The root folders that make the `moelink` package: pyproject's [tool.setuptools.package-dir] rows
    ("moelink.engine" = "engine"). benchmarks/ is one of them (moelink.benchmarks: `moelink bench-serve`)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return re.findall(r'^"moelink\.\w+"\s*=\s*"(\w+)"', section, re.M)


def _sources(folders) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))
            if not any(p.relative_to(ROOT).as_posix().startswith(g + "/") for g in GENERATED)]


def _where(path: Path, line: int, root: Path) -> str:
    return f"{path.relative_to(root).as_posix()}:{line}"


def long_functions(paths, root: Path = ROOT) -> list[str]:
    """'file:line name (N lines)' of each function over MAX_FUNCTION_LINES."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # `lineno` is the def's line: decorators excluded
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{_where(path, node.lineno, root)} {node.name} ({length} lines)")
    return found


def _any_or_object(annotation: ast.expr) -> int:
    """How many times `annotation` names Any (typing.Any too) or object; string annotations (forward references) are
    read as well, a Literal's strings are values."""
    if isinstance(annotation, ast.Name):
        return int(annotation.id in ("Any", "object"))
    if isinstance(annotation, ast.Attribute):
        return int(annotation.attr == "Any")
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            return _any_or_object(ast.parse(annotation.value, mode="eval").body)
        except SyntaxError:
            return 0
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).split(".")[-1] == "Literal":
        return 0
    return sum(_any_or_object(child) for child in ast.iter_child_nodes(annotation) if isinstance(child, ast.expr))


def _annotations(tree: ast.AST):
    """(label, annotation) of every parameter, return and annotated assignment in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]:
                if arg.annotation is not None:
                    yield f"{node.name}({arg.arg})", arg.annotation
            if node.returns is not None:
                yield f"{node.name} ->", node.returns
        elif isinstance(node, ast.AnnAssign):
            yield ast.unparse(node.target), node.annotation


def seam_any(paths, root: Path = ROOT) -> list[str]:
    """'file:line label: annotation' once per Any/object occurrence in the seams' annotations."""
    found = []
    for path in paths:
        for label, annotation in _annotations(ast.parse(path.read_text(), str(path))):
            found += [f"{_where(path, annotation.lineno, root)} {label}: {ast.unparse(annotation)}"] * _any_or_object(annotation)
    return found


def test_the_package_folders_are_read():
    folders = _package_folders()
    assert {"engine", "scheduler", "moe", "comm", "kernels"} <= set(folders), folders


def test_no_function_over_100_lines():
    found = long_functions(_sources(_package_folders()))
    assert not found, (f"{len(found)} function(s) over {MAX_FUNCTION_LINES} lines (split each into helpers that "
                       "say why):\n" + "\n".join(found))


def test_few_any_or_object_annotations_at_the_seams():
    found = seam_any(_sources(SEAMS))
    assert len(found) <= MAX_SEAM_ANY, (f"{len(found)} Any/object annotations at {', '.join(SEAMS)} (at most "
                                        f"{MAX_SEAM_ANY}):\n" + "\n".join(found))


def test_the_checks_see_what_they_count(tmp_path):
    """The counters themselves: a 101-line function is found and a 100-line one is not, decorators aside; nested
    and string annotations count."""
    body = "\n".join(f"    x{i} = {i}" for i in range(99))
    (tmp_path / "m.py").write_text(f"@decorator\n@another\ndef ok():\n{body}\n\ndef long():\n{body}\n    return 1\n")
    paths = [tmp_path / "m.py"]
    assert [f.split(" ", 1)[1] for f in long_functions(paths, tmp_path)] == ["long (101 lines)"]
    (tmp_path / "m.py").write_text("from typing import Any\n"
                                   "def f(a: Any, b: dict[str, Any], c: 'object | None') -> int: ...\n"
                                   "x: typing.Any\ny: Literal['Any'] = 1\n")
    assert len(seam_any(paths, tmp_path)) == 4
