"""The rank side imports without Ray: the GPU image has none, and single-GPU work must not need it.

Every module of engine/rank, engine/spec, engine/kv_transfer, engine/models, engine/contract and engine/config is imported in a fresh
interpreter in which `import ray` fails; so is the in-process executor a single-GPU engine runs on.
"""
from __future__ import annotations

import pytest

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY_FREE = ("engine/rank", "engine/spec", "engine/kv_transfer", "engine/models", "engine/contract", "engine/config")

_BLOCK_RAY = """
import importlib, importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoRay())
for module in sys.argv[1:]:
    importlib.import_module(module)
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray got imported"
print("ok", len(sys.argv) - 1)
"""


def _modules() -> list[str]:
    names = []
    for folder in RAY_FREE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(["moelink", *parts]))
    return names


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_rank_side_imports_without_ray():
    modules = _modules() + ["moelink.engine.cluster.executor"]
    assert "moelink.engine.rank.worker" in modules and "moelink.engine.rank.model_runner" in modules
    proc = subprocess.run([sys.executable, "-c", _BLOCK_RAY, *modules], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["ok", str(len(modules))]
