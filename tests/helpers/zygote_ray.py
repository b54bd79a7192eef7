"""Ray's Python workers forked by the test zygote (tests/helpers/zygote.py) instead of exec'd: ~1.9 s of CPU a
worker (torch and moelink imported again) saved.

Ray builds a worker's command from the `sys.executable` of the process that starts the node (`ray.init`'s driver,
or `ray start`) and hands the raylet that process's environment. Both name the shim (tests/helpers/zygote_shim.py)
here: it forks `default_worker.py` from the zygote (torch already imported) and stays as the raylet's child, in one
process group with the worker; the rest of Ray's Python processes (agents, monitors) exec through it as before. The
raylet registers a worker by the worker ID it passed on the command line, and its pid by what the worker reports
(the forked one, which the tests signal).

- `ray_workers()`: around a test's own `ray.init` (tests/helpers/local_ray.py `local_ray`).
- `node_env(env)`: the environment of a process the zygote forks that starts a Ray node itself (`ray start` run as
  `python -m ray.scripts.scripts`: tests/helpers/local_ray.py `RayHead`): the zygote sets that child's
  `sys.executable` to the shim (zygote.EXECUTABLE_ENV) and the shim's variables reach its raylet.

Off with MOELINK_TEST_RAY_ZYGOTE=0 (or MOELINK_TEST_ZYGOTE=0). Standard library only (the shim imports it).
"""
from __future__ import annotations

import contextlib
import os
import sys

try:
    from . import zygote
except ImportError:  # loaded by the shim, tests/helpers on its sys.path
    import zygote  # type: ignore[no-redef]

RAY_SWITCH = "MOELINK_TEST_RAY_ZYGOTE"
RAY_WORKER_SCRIPT = os.path.join("ray", "_private", "workers", "default_worker.py")
RAY_WORKER_MODULE = "ray._private.workers.default_worker"


def _shim_vars() -> dict:
    """The shim's variables (zygote.shim_env) without PYTHON; {} where Ray's workers are not to be forked. A
    process started with `node_env` (its sys.executable the shim) has them already: its Ray's workers fork from
    the zygote that forked it (no zygote of its own started: ~3 s of CPU importing torch)."""
    if os.environ.get(RAY_SWITCH, "1") == "0":
        return {}
    names = (zygote.SHIM_SOCKET, zygote.SHIM_PYTHON, zygote.SHIM_IMPORT_ENV)
    if sys.executable == zygote.SHIM and all(os.environ.get(k) for k in names):
        return {k: os.environ[k] for k in names}
    env = zygote.shim_env()
    env.pop("PYTHON", None)
    return env


@contextlib.contextmanager
def ray_workers():
    """While a test's `ray.init` starts its Ray: the raylet's Python workers (the EP ranks, Ray's idle workers) are
    forked by this process's zygote (module docstring)."""
    env = _shim_vars()
    if not env:
        yield
        return
    saved = {k: os.environ.get(k) for k in env}
    executable = sys.executable
    os.environ.update(env)
    sys.executable = zygote.SHIM
    try:
        yield
    finally:
        sys.executable = executable
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def node_env(env: dict) -> dict:
    """`env` for a zygote-forked `python -m ...` that starts a Ray node (module docstring); `env` unchanged where
    Ray's workers are not to be forked."""
    shim = _shim_vars()
    return {**env, **shim, zygote.EXECUTABLE_ENV: zygote.SHIM} if shim else dict(env)


def worker_argv(argv: list[str]) -> tuple[list[str], int | None]:
    """The shim's argv, rewritten where it is a Ray worker the raylet starts (`python .../default_worker.py ARGS`):
    run as the module that file is, in the shim's process group (the raylet made it a group of its own and stops a
    worker by its group: the shim and the worker, as one exec'd worker would be). (argv, pgid or None)."""
    if argv[:1] and argv[0].endswith(RAY_WORKER_SCRIPT):
        return ["-m", RAY_WORKER_MODULE, *argv[1:]], os.getpgid(0)
    return argv, None
