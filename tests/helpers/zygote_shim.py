"""The `python` a script started by a test runs (benchmarks/gpu_session.sh's $PYTHON, set by
tests/helpers/gpu_session.py from `zygote.shim_env()`): `python -m MODULE ...`, and `python -c CODE ...` or
`python - ...` (the code on stdin) whose code or arguments name torch, transformers or moelink (the script's checks,
such as `import moelink.kernels.moe_config`, its preflight's version probes, its unpack step), are forked by the test
process's zygote (tests/helpers/zygote.py: torch already imported, ~1.5 s of CPU saved per start), with this process's
stdio, environment and directory; this process stays in between, passes the signals it gets (a `timeout` around the
command, a Ctrl-C) to the forked child and ends as the child ended (its exit code, or the same signal). Anything else
(other `-c` or stdin code, a script file, an interpreter flag, an environment whose import-relevant variables differ from
the zygote's, no zygote reachable) execs the real interpreter, as a plain `python` would run. Standard library only:
it starts with `python -S`.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zygote  # noqa: E402  (tests/helpers/zygote.py: standard library only)
import zygote_ray  # noqa: E402  (tests/helpers/zygote_ray.py: the same)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _exec_real(argv: list[str]) -> None:
    real = os.environ[zygote.SHIM_PYTHON]
    os.execv(real, [real, *argv])


def _exec_real_stdin(code: str, args: list[str]) -> None:
    """`python - ARGS` with `code` on its stdin again (a pipe this process fills first: a heredoc's code is small)."""
    data = code.encode("utf-8", "surrogateescape")
    r, w = os.pipe()
    if len(data) <= 65536:  # fits a pipe's buffer: written before the exec
        os.write(w, data)
    elif os.fork() == 0:  # else a writer beside it
        os.close(r)
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    os.dup2(r, 0)
    os.close(r)
    _exec_real(["-", *args])


def _names_preloaded(code_and_args: list[str]) -> bool:
    return any(name in part for part in code_and_args for name in ("torch", "transformers", "moelink"))


def main(argv: list[str]) -> int:
    path = os.environ.get(zygote.SHIM_SOCKET)
    wanted = os.environ.get(zygote.SHIM_IMPORT_ENV)
    same_env = path and wanted is not None and zygote._import_env(dict(os.environ)) == json.loads(wanted)
    if same_env and argv[:1] == ["-"]:
        # The code on stdin (a script's heredoc), read here as CPython reads all of it before it runs; forked as
        # `-` with that code (the zygote runs it as <stdin>, argv[0] "-"), else exec'd with the code on a pipe.
        code = sys.stdin.buffer.read()
        argv = ["-", code.decode("utf-8", "surrogateescape"), *argv[1:]]
    # A Ray worker the raylet starts (tests/helpers/zygote_ray.py) runs as the module that file is, in this
    # process's group.
    given = argv
    argv, pgid = zygote_ray.worker_argv(argv)
    # Code that names none of the preloaded packages is cheaper exec'd (~0.04 s of CPU) than forked (~0.2 s).
    forkable = len(argv) >= 2 and (argv[0] == "-m" or (argv[0] in ("-c", "-") and _names_preloaded(argv[1:])))
    read_stdin = argv[0] == "-" and len(argv) >= 2
    if not (forkable and same_env):
        _exec_real_stdin(argv[1], argv[2:]) if read_stdin else _exec_real(given)
    try:
        pid, status = zygote.spawn_at(path, list(argv), dict(os.environ), os.getcwd(), (0, 1, 2), pgid)
    except OSError:  # the zygote is gone (its test process ended): run it the plain way
        _exec_real_stdin(argv[1], argv[2:]) if read_stdin else _exec_real(given)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    while True:  # the status arrives when the zygote reaps the child; signals interrupt the wait, then it goes on
        ready, _, _ = select.select([status], [], [])
        if ready:
            break
    data = status.recv(64)
    code = json.loads(data)["returncode"] if data else -signal.SIGKILL
    if code < 0:  # ended by a signal: end the same way, as the caller of a plain python would see
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
