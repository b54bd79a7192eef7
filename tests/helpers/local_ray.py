"""Every Ray a test starts is its own: a temp dir of its own and an explicit address on 127.0.0.1.

Never /tmp/ray, never address="auto": both are machine-wide state, so another Ray on the machine (another
test run, a user's cluster) would be joined, or would have its session files mixed with ours. The temp
dirs are short and under /tmp (Ray's socket paths must stay under 107 bytes); whatever still uses one at
the end is killed by PID, then the dir is removed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# LOOPBACK_ENV: Ray replaces a node address of 127.0.0.1 by this host's routable one and binds every interface,
# unless this is "0" (a one-node cluster); ray_on_loopback sets it (and Ray's constant) while a Ray starts.
from moelink.engine.cluster.ray_executor import RAY_LOOPBACK_ENV as LOOPBACK_ENV, ray_on_loopback

from . import zygote, zygote_ray
from .net import free_port
from .waits import wait_until

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")


def remove_ray_dir(path: str) -> None:
    """Kill (by PID) whatever still uses `path`, then remove it."""
    from moelink.engine.cluster.ray_guard import processes_using

    for pid in processes_using(path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def ray_temp_dir(prefix: str = "mlray-"):
    """A fresh short temp dir for one Ray (or for RAY_TMPDIR); cleaned up by remove_ray_dir on exit."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        remove_ray_dir(path)


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """`ray.init` of a new local Ray in this process: its own temp dir, 127.0.0.1, no dashboard.

    Yields the `ray` module; shuts Ray down and removes its dir on exit. Refuses to run when this process
    is already connected to a Ray (a test that left one behind), instead of silently sharing it.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("a Ray instance is already initialized in this process (left behind by a test?)")
    with ray_temp_dir("mlray-") as temp_dir:
        try:
            with ray_on_loopback(), zygote_ray.ray_workers():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
            yield ray
        finally:
            ray.shutdown()


# How long a Ray process group stopped by a test gets after SIGTERM before SIGKILL. `ray start --block` answers
# SIGTERM by stopping its node's processes one by one, each with its own grace: about 33 s for a head on the
# 2-core machines, which was the longest part of the tests that start one. What the tests check is done by
# then; the rest of the group and anything still using the Ray dir is killed by PID (remove_ray_dir).
STOP_GRACE_S = 3.0

# What `ray start` logs once its node is up; RayHead asks `ray status` from then on (every 1 s), and at most
# every RAY_STATUS_EVERY_S before (a Ray that logs otherwise is still seen, later).
RAY_STARTED = "Ray runtime started."
RAY_STATUS_EVERY_S = 5.0


def stop_process_group(proc: subprocess.Popen | zygote.ZygoteChild | None, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM `proc`'s process group (started with start_new_session=True), SIGKILL it after `grace` seconds;
    returns once `proc` is reaped (bounded)."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (the raylet's workers): SIGKILL whatever is left of it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


class RayHead:
    """`ray start --head --block` on 127.0.0.1, an explicit free port and a temp dir of its own.

    `address` is what a driver joins (never "auto"). `close()` stops the head's process group (SIGTERM,
    then SIGKILL) and removes its dir, killing by PID anything of it still left there.
    """

    def __init__(self, log: Path, env: dict, num_cpus: int = 4, ready_timeout: float = 90.0):
        if RAY is None:
            raise RuntimeError("the `ray` command is not installed")
        self.env = dict(env)
        self.env[LOOPBACK_ENV] = "0"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="mlhead-", dir="/tmp")
        self.log = log
        with open(log, "w") as out:
            # Unbuffered: its "Ray runtime started." line reaches the log when it is printed (see _wait_ready).
            # `ray start` is Ray's CLI module run by this interpreter (the `ray` command runs the same `main`),
            # forked by the test zygote with its sys.executable the shim: the head's Ray workers (the driver's EP
            # ranks, Ray's idle workers) fork from the zygote too (tests/helpers/zygote_ray.py), each a process
            # of its own as before.
            self.proc = zygote.popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                 "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                 "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                 "--temp-dir", self.temp_dir],
                env=zygote_ray.node_env({**self.env, "PYTHONUNBUFFERED": "1"}), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Until `ray status` answers on the head's address (polled: the head is another process). Each `ray
        status` is a Python process importing Ray (~0.6 s of CPU): it is asked once `ray start` has logged
        RAY_STARTED (read every 0.2 s), or at most every RAY_STATUS_EVERY_S before that."""
        asked = [time.monotonic()]  # (no `ray status` in the first seconds: the head is not up that soon)

        def answers():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            now = time.monotonic()
            if RAY_STARTED not in self.log.read_text() and now - asked[0] < RAY_STATUS_EVERY_S:
                return False
            if now - asked[0] < 1.0:
                return False
            asked[0] = now
            status = subprocess.run([RAY, "status", "--address", self.address], env=self.env,
                                    capture_output=True, text=True, timeout=60)
            return status.returncode == 0

        wait_until(answers, timeout, f"the Ray head on {self.address} to answer", interval=0.2,
                   detail=lambda: self.log.read_text()[-3000:])

    def close(self) -> None:
        stop_process_group(self.proc)
        remove_ray_dir(self.temp_dir)

    def __enter__(self) -> "RayHead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
