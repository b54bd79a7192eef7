"""Every package of the checkout ships: the wheel (the GPU image's `pip install .`) holds every folder with an
`__init__.py` under the root folders (pyproject's package-dir), and the editable install (`make setup`) imports each
from its folder. The packages are found by setuptools' discovery (setup.py), never listed by hand: a hand list once left
moelink.engine.server.gateway out of the wheel (2026-11-26), and a new model family's folder needs no edit."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _roots() -> dict[str, str]:
    """pyproject's package-dir: `moelink.<root>` -> its folder, one per root folder."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _package_folders() -> set[str]:
    """`moelink.<dotted folder>` of every folder with an __init__.py under the root folders."""
    found = set()
    for name, folder in _roots().items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if not any(part.startswith((".", "__pycache__")) for part in rel.parts):
                found.add(".".join([name, *rel.parts]))
    return found


def test_package_dir_maps_every_root_package_folder_and_nothing_nested():
    """package-dir names each root folder that is a package (all but tests/) as `moelink.<folder>`, and only those:
    what lies below a root is found (setup.py), so a new folder under one needs no line."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert _roots() == {f"moelink.{p}": p for p in packages}, sorted(set(_roots()) ^ {f"moelink.{p}" for p in packages})


@pytest.mark.slow  # builds the wheel from a copy of the checkout, about 5 s
def test_the_wheel_holds_every_package_folder(tmp_path):
    # A copy of what git sees (tracked files and untracked ones it does not ignore): the build writes build/ and
    # *.egg-info beside the sources, which must not touch the checkout.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        for name in files:
            if name and (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name)
    with tarfile.open(tmp_path / "src.tar") as tar:
        tar.extractall(src, filter="data")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("moelink-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    expected = _package_folders()
    assert "moelink.engine.models.deepseek_v4" in expected and "moelink.engine.server.gateway" in expected
    assert not expected - shipped, f"package folders missing from the wheel: {sorted(expected - shipped)}"
    assert not {n for n in names if n.startswith(("tests/", "moelink/tests/"))}
    assert "moelink/kernels/configs/default.json" in names  # package data (pyproject's package-data)
    assert "moelink/kernels/csrc/cpu_ops.c" in names  # the native CPU kernels' source, built at first use


def test_the_installed_package_imports_every_package_folder_from_the_checkout():
    for name in sorted(_package_folders()):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        expected = ROOT.joinpath(*name.split(".")[1:], "__init__.py")  # each root folder is its own name
        assert Path(spec.origin).resolve() == expected.resolve(), (name, spec.origin)
