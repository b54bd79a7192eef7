"""The built-in model's training text: the docstrings of the Python standard library.

Every Python install carries this text, so the built-in model (builtin-model/, made by train_builtin.py)
can be retrained anywhere without a download. Docstrings are read from the source files with `ast`, never by
importing a module (importing runs code: `antigravity` opens a browser, `this` prints, some modules need a
display). The order is fixed (module names sorted, files sorted, definitions in file order), so one Python
version gives one corpus.

Two kinds of document come out:
- prose: each docstring, cleaned into paragraphs of running text (doctest sessions, indented code, tables
  and other lines that are mostly not letters are dropped; reST roles are unwrapped to their text);
- chat: for a definition with a one-line summary, a ChatML turn asking what it does and answering with the
  summary, so the chat API of the built-in model answers in the template's format and stops at <|im_end|>.
"""
from __future__ import annotations

import ast
import inspect
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .tiny_corpus import IM_END, IM_START

# Folders inside stdlib packages that hold test suites or test data, not library docs.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "__phello__", "site-packages"})
# Modules whose docstrings are not English prose (the Zen is rot13-encoded; the others are jokes or stubs).
_SKIP_MODULES = frozenset({"this", "antigravity", "__hello__", "__phello__"})

_ROLE = re.compile(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`os.path.join` -> os.path.join
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")                    # ``None`` / `x` -> None / x
_WORD = re.compile(r"[A-Za-z]+")
_MIN_LETTER_RATIO = 0.75  # letters and spaces over all characters, per line
_MIN_WORDS = 4            # a paragraph shorter than this is a heading or a stray name


@dataclass(frozen=True)
class Doc:
    """One docstring: where it came from and its cleaned paragraphs (each one line of running text)."""

    module: str  # dotted module name ("json.decoder")
    qualname: str  # "" for the module itself, else "JSONDecoder.decode"
    paragraphs: tuple[str, ...]


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Optional[Path] = None) -> Iterator[tuple[str, Path]]:
    """(module name, source file) of every stdlib module with Python source, in a fixed order."""
    root = stdlib_dir() if root is None else Path(root)
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP_MODULES:
            continue
        pkg, mod = root / name, root / f"{name}.py"
        if mod.is_file():
            yield name, mod
        elif (pkg / "__init__.py").is_file():
            for path in sorted(pkg.rglob("*.py")):
                rel = path.relative_to(root)
                if _SKIP_DIRS.intersection(rel.parts[:-1]) or path.name.startswith("test_"):
                    continue
                parts = rel.with_suffix("").parts
                yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _clean_line(line: str) -> str:
    line = _ROLE.sub(r"\1", line)
    line = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), line)
    return " ".join(line.split())  # column-aligned lists leave runs of spaces


def _is_prose(line: str) -> bool:
    if not line or line.startswith((">>>", "...", "$ ", "%", "#", "|", "+-", "==", "--", "..")):
        return False
    letters = sum(c.isalpha() or c == " " for c in line)
    return letters / len(line) >= _MIN_LETTER_RATIO and line.isascii()


def clean_docstring(doc: str) -> tuple[str, ...]:
    """Paragraphs of prose in a docstring, each reflowed to one line; () when there is none.

    A paragraph is a run of unindented lines (after `inspect.cleandoc`); indented lines are code examples,
    argument tables or literal blocks and end the paragraph, as do lines that are mostly not letters.
    """
    paragraphs, current = [], []

    def flush():
        text = " ".join(current)
        if len(_WORD.findall(text)) >= _MIN_WORDS:
            paragraphs.append(text)
        current.clear()

    for raw in inspect.cleandoc(doc).splitlines():
        line = _clean_line(raw)
        if raw[:1].isspace() or not _is_prose(line):
            flush()
        else:
            current.append(line)
    flush()
    return tuple(paragraphs)


def _docstrings(module: str, tree: ast.Module) -> Iterator[Doc]:
    """The module's docstring, then each class and function (nested ones too) in source order."""
    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc:
                    yield Doc(module, qual, clean_docstring(doc))
                yield from visit(child, qual + ".")

    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield Doc(module, "", clean_docstring(doc))
    yield from visit(tree, "")


def stdlib_docs(root: Optional[Path] = None, max_files: Optional[int] = None) -> Iterator[Doc]:
    """Every stdlib docstring with at least one paragraph of prose, in a fixed order.

    max_files: stop after this many source files (the training script's smoke test reads a slice).
    """
    for i, (module, path) in enumerate(stdlib_sources(root)):
        if max_files is not None and i >= max_files:
            return
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):  # lib2to3 fixtures, odd encodings: not docs
            continue
        for doc in _docstrings(module, tree):
            if doc.paragraphs:
                yield doc


def prose_text(doc: Doc) -> str:
    return "\n\n".join(doc.paragraphs)


def chat_text(doc: Doc) -> Optional[str]:
    """A ChatML exchange asking what a definition does, answered by its summary line; None if it has none."""
    if not doc.qualname or any(part.startswith("_") for part in f"{doc.module}.{doc.qualname}".split(".")):
        return None
    summary = doc.paragraphs[0]
    if len(summary) > 400:
        return None
    name = f"{doc.module}.{doc.qualname}"
    return (f"{IM_START}user\nWhat does {name} do?{IM_END}\n"
            f"{IM_START}assistant\n{summary}{IM_END}\n")


def corpus_words(texts) -> dict[str, int]:
    """Lower-cased alphabetic words and their counts (the word-ratio test's dictionary)."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in _WORD.findall(text):
            w = w.lower()
            counts[w] = counts.get(w, 0) + 1
    return counts
