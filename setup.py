"""The package list, found rather than listed: the repository root is the package `moelink`, each root folder one of
its subpackages (pyproject.toml's `[tool.setuptools.package-dir]`: "moelink.engine" = "engine", ...), and under each
root setuptools' own discovery (`find_packages`) names every folder with an `__init__.py`. A new folder (a model
family's engine/models/<family>/) needs no edit here or in pyproject.toml; tests/test_packaging.py builds the wheel
and checks that every such folder is in it.

pyproject.toml's declarative `[tool.setuptools.packages.find]` cannot do this: it names the packages it finds relative
to the folder it searches (`engine.models`), without the `moelink.` the mapping gives them. Everything else about the
project stays in pyproject.toml.
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.config.pyprojecttoml import read_configuration

HERE = Path(__file__).resolve().parent


def packages() -> list[str]:
    """Every root of package-dir, and each package folder under it, under its `moelink.` name."""
    roots = read_configuration(HERE / "pyproject.toml", expand=False)["tool"]["setuptools"]["package-dir"]
    found = []
    for name, folder in roots.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]
    return sorted(set(found))


setup(packages=packages())
