"""mypy over the whole `moelink` package (`make typecheck`, run first by `make test`; docs/testing.md).

    python -m tests.helpers.typecheck [MYPY_ARGS...]

pyproject.toml maps each root folder to a subpackage (`moelink.engine` -> engine/, `moelink.kernels` -> kernels/, ...)
and the editable install resolves `moelink.*` through an import hook, which mypy cannot follow. So this makes a link
tree that has the package's real layout, `.mypy_cache/src/moelink/<sub>` -> `<folder>` (one symlink per mapped root
folder, read from pyproject's package-dir), which `[tool.mypy] mypy_path` points at, runs mypy with pyproject's
config, and prints the errors with the checkout's own paths (`kernels/x.py`, not the link tree's).
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINKS = ROOT / ".mypy_cache" / "src"  # [tool.mypy] mypy_path


def package_dirs() -> dict[str, str]:
    """pyproject's package-dir, less the entries that merely repeat their parent's layout: {"engine": "engine", ...}."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    roots = {}
    for name, folder in mapping.items():
        parent, _, leaf = name.rpartition(".")
        if parent in mapping and folder == f"{mapping[parent]}/{leaf}":
            continue
        assert parent == "moelink", f"package-dir maps {name} to {folder}: the link tree knows moelink.<sub> only"
        roots[leaf] = folder
    return roots


def link_tree() -> Path:
    """Make (or refresh) `.mypy_cache/src/moelink/`; returns `.mypy_cache/src`."""
    pkg = LINKS / "moelink"
    pkg.mkdir(parents=True, exist_ok=True)
    want = package_dirs()
    for entry in pkg.iterdir():
        if entry.name not in want:
            entry.unlink()
    for sub, folder in want.items():
        link, target = pkg / sub, os.path.relpath(ROOT / folder, pkg)
        if not (link.is_symlink() and os.readlink(link) == target):
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
    return LINKS


def real_paths(text: str) -> str:
    """mypy's report with the link tree's paths (`.mypy_cache/src/moelink/kernels/`) as the checkout's (`kernels/`)."""
    for sub, folder in package_dirs().items():
        for prefix in (f"{LINKS}/moelink/{sub}/", f"{LINKS.relative_to(ROOT)}/moelink/{sub}/"):
            text = text.replace(prefix, f"{folder}/")
    return text


def run(*args: str) -> tuple[str, str, int]:
    """mypy with pyproject's config (its paths are the repository root's, from any directory): (stdout, stderr, exit
    status). No arguments: the package (`[tool.mypy] packages`); else e.g. a file to check against the package."""
    from mypy import api

    link_tree()
    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *args])
    return real_paths(out), real_paths(err), status


def run_isolated(*args: str) -> tuple[str, str, int]:
    """`run` in a child process (this module's `main`): what a test calls. mypy in the pytest worker itself left its
    build in the heap, 8.2 million objects after a cold run (a full collection then took 7.9 s of CPU), and every
    engine the worker started after it collected that heap at start-up (engine/contract/gc_policy.py): the cold
    fresh-clone runs' tests/engine cost twice their CPU (741 s against 393 in place with a warm cache)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "tests.helpers.typecheck", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    return done.stdout, done.stderr, done.returncode


def main() -> int:
    out, err, status = run(*sys.argv[1:])
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    sys.exit(main())
