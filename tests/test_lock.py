"""The locked dependency set (requirements/, docs/dependencies.md; issue 40): every pin satisfies pyproject.toml's
ranges, the GPU lock differs from the CPU one only where the CUDA torch decides, and under `make test` the
environment is the lock."""
from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK = ROOT / "requirements" / "lock-cpu.txt"
GPU_LOCK = ROOT / "requirements" / "lock-gpu.txt"
FOLLOW_TORCH = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")


def _lock(path: Path) -> dict[str, Version]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        assert m, f"{path.name}:{n}: {line!r} is not `name==version`"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": ""})]


@pytest.mark.parametrize("lock, extras", [(CPU_LOCK, ("test",)), (GPU_LOCK, ("test", "gpu"))], ids=["cpu", "gpu"])
def test_the_lock_pins_every_requirement_inside_pyprojects_ranges(lock, extras):
    pins = _lock(lock)
    for req in _requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name} (pyproject.toml: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject.toml's {req}"


def test_the_lock_pins_the_build_backend_and_the_torch_the_makefile_installs():
    pins = _lock(CPU_LOCK)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in map(Requirement, build):
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{req} vs {pins.get(req.name)}"
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pins["torch"].public == Version(spec).public, f"Makefile installs torch=={spec}, the lock {pins['torch']}"


def test_the_gpu_lock_is_the_cpu_lock_but_for_what_the_cuda_torch_decides():
    cpu, gpu = _lock(CPU_LOCK), _lock(GPU_LOCK)
    differ = {n for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n] and not FOLLOW_TORCH.match(n)}
    assert not differ, f"the GPU lock moves {sorted(differ)} away from the CPU lock's versions"
    assert gpu["torch"].local is None, "the GPU lock's torch is PyPI's CUDA build"
    assert not (set(cpu) - set(gpu) - {"setuptools"}), "the GPU lock drops packages the CPU set needs"


@pytest.mark.skipif(not os.environ.get("MOELINK_LOCK"), reason="`make test` (MOELINK_LOCK) checks the installed set")
def test_the_environment_under_test_is_the_lock():
    lock = Path(os.environ["MOELINK_LOCK"])
    wrong = {}
    for name, version in _lock(lock).items():
        if name == "setuptools":
            continue  # the build environment's, not necessarily this one's
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(version), None)
            continue
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert not wrong, f"installed packages differ from {lock.name} (locked, installed): {wrong}; run `make setup`"
