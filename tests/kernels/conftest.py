"""Fixtures for the Triton kernel tests: device, fresh seeds, NaN-poisoned workspaces, error checks.

Without a GPU, the Triton kernels run in the CPU interpreter. Triton reads
TRITON_INTERPRET when a kernel is *defined*, so it is set here, at conftest
import, before any test module imports moelink.kernels.triton_* (ops.py
imports them lazily, so engine tests collected earlier do not define them
first). Only the Triton kernels read the variable; the rest of the suite is
unaffected. With a GPU the same small-shape tests run compiled on CUDA.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:  # the interpreter without its per-helper-call re-patching (tests/helpers/fast_interpreter.py: why)
    from tests.helpers.fast_interpreter import install as _fast_interpreter

    _fast_interpreter()
KERNEL_DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")

# Normwise relative error ||got - want|| / ||want|| against a float64 oracle.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def kdev() -> torch.device:
    """Where the kernels under test run: CPU (interpreter) here, CUDA on a GPU machine."""
    return KERNEL_DEVICE


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed and attached to the report; MOELINK_TEST_SEED=N replays one."""
    s = int(os.environ.get("MOELINK_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s} (rerun with MOELINK_TEST_SEED={s})")
    return s


@pytest.fixture
def gen(seed, kdev) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def poison_workspaces(monkeypatch):
    """Every buffer the Triton wrappers allocate starts as NaN (floats) or a large junk value (ints),
    so a kernel that reads memory it never wrote fails the comparison."""
    from moelink.kernels import triton_common

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else 2**30 - 1)

    monkeypatch.setattr(triton_common, "workspace", poisoned)


@pytest.fixture
def nan_buffer():
    """nan_buffer(shape, dtype, device): an output buffer poisoned with NaN before the call."""
    return lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double().cpu(), want.double().cpu()
    return float((got64 - want64).norm() / want64.norm().clamp_min(1e-300))


@pytest.fixture
def check(seed):
    """check(got, want64, dtype, what): finite, and normwise relative error under the dtype's tolerance."""

    def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> float:
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)} (seed={seed})"
        assert torch.isfinite(got).all(), f"{what}: non-finite output (seed={seed})"
        if want.abs().max() == 0:
            assert got.abs().max() == 0, f"{what}: expected all zeros (seed={seed})"
            return 0.0
        err = rel_error(got, want)
        assert err < REL_TOL[dtype], f"{what}: relative error {err:.3g} >= {REL_TOL[dtype]:g} for {dtype} (seed={seed})"
        return err

    return _check


@pytest.fixture(scope="session")
def mla_compile_report(tmp_path_factory):
    """benchmarks/compile_report.py run once as a user runs it, `--only mla --quick`, in a child forked by the test
    zygote: (the finished process, the report's path without its suffix). test_compile_report.py (the script runs
    without a GPU) and test_mla.py (MLA's kernels compile without spills) read the same run, each test marked
    xdist_group("mla_compile_report"), so one child of ~8 CPU-s serves both (each started its own: norm's and MLA's).
    Triton's own cache, not a fresh one per run: the kernels' compiled PTX/cubin and metadata are keyed by their
    source, options, target and Triton version, so a hit analyzes the same binaries; only the report's compile
    seconds (not checked) stop being cold ones."""
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no Triton NVIDIA backend: {e}")
    from triton import knobs

    from tests.helpers import zygote

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("compile_report") / "mla"
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.compile_report", "--only", "mla", "--quick",
                       "--cache-dir", knobs.cache.dir, "--out", str(out)],
                      capture_output=True, text=True, timeout=600, env=env)
    return proc, out
