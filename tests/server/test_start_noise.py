"""Start-up noise (issue 54, item 10), each by its mechanism.

- gRPC's `fork_posix.cc:71 Other threads are currently calling into gRPC, skipping fork() handlers` at every
  `moelink serve`: smg was started with a preexec_fn (PR_SET_PDEATHSIG), which makes Popen fork() while gRPC's
  threads run. A bootstrap now asks for the signal and exec()s smg, and Popen uses vfork (no fork handlers);
  smg still dies with a SIGKILLed server. (tests/server/test_vllm_routes.py checks a real server's stderr.)
- Ray's log-record factory marks every record with `_ray_timestamp_ns`, which the server's formatters printed
  as a field of every line once Ray was imported.
- Ray's "Token authentication is enabled for this Ray cluster" warning at every local Ray start: the mode is
  now said explicitly, which is what Ray turns on anyway. (tests/ep/test_ep_lifecycle.py checks a real
  `moelink serve -ep 2`'s stderr for both Ray lines.)
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers.waits import wait_until

_FORK_LINE = "Other threads are currently calling into gRPC"


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_starting_smg_beside_a_running_grpc_server_forks_nothing():
    """The gateway's way of starting smg, beside a serving grpc.aio server: no fork(), so gRPC says nothing; with
    a preexec_fn (the old way) it does, which shows the check can fail."""
    code = """
        import asyncio, subprocess, sys
        import grpc
        from moelink.engine.server.gateway.supervisor import dying_with_parent

        async def main():
            server = grpc.aio.server()
            server.add_insecure_port("127.0.0.1:0")
            await server.start()
            await asyncio.sleep(0.3)
            extra = dict(preexec_fn=lambda: None) if sys.argv[1:] == ["old"] else {}
            proc = subprocess.Popen(dying_with_parent(["true"]), start_new_session=True, stdin=subprocess.DEVNULL,
                                    **extra)
            proc.wait()
            await asyncio.sleep(0.3)
            await server.stop(0)
            print("exit", proc.returncode)

        asyncio.run(main())
    """
    now = _python(code)
    out, err = now.communicate(timeout=60)
    assert out.strip() == "exit 0" and _FORK_LINE not in err, err
    old = _python(code.replace("sys.argv[1:] == [\"old\"]", "True"))
    _, err = old.communicate(timeout=60)
    assert _FORK_LINE in err, "a fork() beside gRPC's threads no longer warns: this test proves nothing"


def test_smg_still_dies_with_a_sigkilled_server():
    parent = _python("""
        import subprocess, time
        from moelink.engine.server.gateway.supervisor import dying_with_parent

        child = subprocess.Popen(dying_with_parent(["sleep", "60"]), start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    try:
        pid = int(parent.stdout.readline())
        # exec()ed in place: the PID Popen returned is the command's own.
        wait_until(lambda: open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:2] == [b"sleep", b"60"], 10,
                   "the bootstrap to exec the command")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not _alive(pid), 10, "the child of a SIGKILLed parent to get its SIGTERM")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_rays_mark_on_every_log_record_is_no_field_of_the_line():
    from ray._private.log import _setup_log_record_factory

    from moelink.engine.server.server import JsonFormatter, _TextWithExtras

    before = logging.getLogRecordFactory()
    _setup_log_record_factory()  # what `import ray` does
    try:
        record = logging.getLogger("moelink.test").makeRecord("moelink.test", logging.INFO, __file__, 1,
                                                             "request admitted", (), None,
                                                             extra={"request_id": "r1"})
    finally:
        logging.setLogRecordFactory(before)
    assert "_ray_timestamp_ns" in record.__dict__
    line = _TextWithExtras("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "INFO moelink.test: request admitted request_id=r1", line
    doc = json.loads(JsonFormatter().format(record))
    assert doc["request_id"] == "r1" and not any(k.startswith("_") for k in doc), doc


@pytest.fixture
def ray_auth_state(monkeypatch):
    """RAY_AUTH_MODE unset for the test; afterwards restored and Ray's cached config read again."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    yield
    monkeypatch.undo()
    from ray._raylet import Config

    Config.initialize("")


def _ray_auth_warnings(call) -> list[str]:
    from ray._private.authentication import authentication_token_setup as ats

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # Ray's logger does not propagate to the root
    ats.logger.addHandler(handler)
    try:
        call(ats)
    finally:
        ats.logger.removeHandler(handler)
    return seen


def test_the_local_ray_says_token_auth_so_ray_does_not_warn(ray_auth_state):
    from moelink.engine.cluster.ray_runtime import quiet_token_auth

    # What ray.init runs for a new local cluster with the mode unset: token auth on, and the warning.
    said = _ray_auth_warnings(lambda ats: ats.enable_token_auth_by_default())
    assert any("Token authentication is enabled" in m for m in said), said
    os.environ.pop("RAY_AUTH_MODE", None)

    quiet_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"  # the same mode Ray picks
    assert _ray_auth_warnings(lambda ats: ats.enable_token_auth_by_default()) == []
