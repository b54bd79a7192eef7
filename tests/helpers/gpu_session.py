"""Running benchmarks/gpu_session.sh from the tests (tests/benchmarks/test_gpu_session*.py): the script, its `plan`
line format, and what the device tool returns of a step's $OUT."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from . import zygote
from .fast_interpreter import lazy_interpreter_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns
MAX_FILES_PER_STEP = 8
PLAN = re.compile(r"^PLAN step=(\S+) cmd=(\S+) gemm_compiles=(\d+) slow_compiles=(\d+) other_compiles=(\d+) "
                  r"run_s=(\d+) budget_s=(\d+) :: (.*)$", re.M)


def session(*args: str, out: Path | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """The script run with `args` under this Python, $OUT at `out`; the session-state variables (commit, compute
    capability, state file) only where `env` gives them, so the caller's environment does not leak in."""
    # $PYTHON: the zygote's shim where there is a zygote (its `-m` children forked with torch imported; the rest
    # exec'd: tests/helpers/zygote_shim.py), else this interpreter.
    e = {**os.environ, "PYTHON": sys.executable, **zygote.shim_env()}
    e.update(env)
    e.pop("TRITON_INTERPRET", None)  # the script's children set what they need
    e = lazy_interpreter_env(e)  # and those that turn the interpreter on get the suite's faster one
    for k in ("MOELINK_COMMIT", "GPU_CC", "GPU_SESSION_STATE"):
        if k not in env:
            e.pop(k, None)
    if out is not None:
        e["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=e)


def assert_device_safe(out: Path) -> None:
    """A step's $OUT holds what the device tool brings back: a few plain files with safe names."""
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES_PER_STEP, files
    for f in files:
        assert f.is_file() and SAFE_NAME.match(f.name), f"{f.name}: the device tool would not return it"
