"""Every package of the checkout is in pyproject's `[tool.setuptools] packages`: a non-editable install (a wheel, the
GPU image's `pip install .`) ships only those, so a folder left out imports in the editable checkout and fails in
the wheel (moelink.engine.server.gateway was, 2026-11-26)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_for_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    roots = setup["package-dir"]
    found = set()
    for name, folder in roots.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "__pycache__")) for part in rel.parts):
                continue
            found.add(".".join([name, *rel.parts]))
    assert not found - listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
