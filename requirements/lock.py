"""`make lock`: the tested dependency set, every transitive package pinned, as pip constraints files.

    python requirements/lock.py [--python python3] [--torch-spec torch==2.13.0]

- requirements/lock-cpu.txt: a fresh virtualenv (.lock-venv/) gets the CPU torch (TORCH_SPEC: on our machines
  pip finds its CPU wheel on local disk), then `.[test]` at the newest releases pyproject.toml allows, plus the
  newest setuptools (the editable install's build backend: PIP_CONSTRAINT pins it in pip's build environment
  too); its `pip freeze` is the lock. Run the suite on it (`make test`) before committing a new lock.
- requirements/lock-gpu.txt: the same requirements plus `.[gpu]` with PyPI's CUDA torch, resolved for Linux
  x86_64 / CPython 3.11 without installing anything (`pip install --dry-run --report`), every package the CPU
  lock names kept at its version but torch, triton and the CUDA libraries, which follow the CUDA torch.

Why pip constraints and not a uv lock: the CPU torch wheel our machines carry is found by pip's find-links
(uv does not look there and would download the multi-GB CUDA build), and constraints keep `pip install -e .`
as the one way the project installs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".lock-venv"
CPU_LOCK = ROOT / "requirements" / "lock-cpu.txt"
GPU_LOCK = ROOT / "requirements" / "lock-gpu.txt"
# Versions that follow the CUDA torch in the GPU lock rather than the CPU lock.
FOLLOW_TORCH = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")
# pip takes each --platform tag literally: a glibc 2.28 machine also installs wheels tagged for older glibcs.
GPU_PLATFORM = [*(a for minor in range(28, 4, -1) for a in ("--platform", f"manylinux_2_{minor}_x86_64")),
                *(a for t in ("manylinux2014", "manylinux2010", "manylinux1") for a in ("--platform", f"{t}_x86_64")),
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                "--abi", "none", "--only-binary=:all:"]


def _name(line: str) -> str:
    return re.split(r"[=<>!~ ;\[]", line, 1)[0].strip().lower().replace("_", "-")


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _header(what: str, python: str) -> str:
    ver = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return (f"# {what}\n# Made by `make lock` (requirements/lock.py) on Python {ver}; installed by `make setup` as "
            f"pip constraints.\n# Edit pyproject.toml's ranges, not this file.\n")


def requirements(extras: tuple[str, ...]) -> list[str]:
    """pyproject.toml's dependencies and the named extras, as requirement strings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def lock_cpu(python: str, torch_spec: str) -> list[str]:
    shutil.rmtree(VENV, ignore_errors=True)
    _run(python, "-m", "venv", str(VENV))
    pip = [str(VENV / "bin" / "python"), "-m", "pip"]
    _run(*pip, "install", "--quiet", torch_spec)
    _run(*pip, "install", "--quiet", "--upgrade", "setuptools")
    _run(*pip, "install", "--quiet", "-e", ".[test]", cwd=ROOT)
    frozen = subprocess.run([*pip, "freeze", "--all", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    pins = sorted((l for l in frozen if "==" in l and _name(l) not in ("pip", "moelink")), key=_name)
    CPU_LOCK.write_text(_header("The CPU set the suite passes with (torch's CPU build).", python)
                        + "\n".join(pins) + "\n")
    return pins


def lock_gpu(python: str, torch_spec: str, cpu_pins: list[str]) -> None:
    pip = [str(VENV / "bin" / "python"), "-m", "pip"]
    keep = VENV / "gpu-constraints.txt"
    keep.write_text("\n".join(p for p in cpu_pins if not FOLLOW_TORCH.match(_name(p))) + "\n")
    report = VENV / "gpu-report.json"
    # PyPI only (no local wheels, no machine-wide constraints): the GPU lock is what a GPU machine resolves.
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL")}
    env["PIP_CONFIG_FILE"] = os.devnull  # the machine's pip.conf names local wheels and a torch cap
    torch_gpu = torch_spec.split("+", 1)[0]
    reqs = [r for r in requirements(("test", "gpu")) if _name(r) != "torch"]
    _run(*pip, "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), *GPU_PLATFORM,
         "--target", str(VENV / "gpu-target"),  # pip 23 asks for a target with --platform; --dry-run writes nothing
         "-c", str(keep), torch_gpu, *reqs, env=env)
    installs = json.loads(report.read_text())["install"]
    pins = sorted((f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installs), key=_name)
    GPU_LOCK.write_text(_header("The GPU set: the CPU lock's versions with PyPI's CUDA torch and `.[gpu]` "
                                "(Linux x86_64, CPython 3.11).", python) + "\n".join(pins) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--torch-spec", default="torch==2.13.0")
    ap.add_argument("--gpu-only", action="store_true", help="re-resolve the GPU lock from the committed CPU lock")
    args = ap.parse_args()
    if args.gpu_only:
        cpu = [l for l in CPU_LOCK.read_text().splitlines() if l and not l.startswith("#")]
    else:
        cpu = lock_cpu(args.python, args.torch_spec)
    lock_gpu(args.python, args.torch_spec, cpu)
    print(f"wrote {CPU_LOCK.relative_to(ROOT)} and {GPU_LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
