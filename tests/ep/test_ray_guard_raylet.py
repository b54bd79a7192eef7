"""A dead raylet's workers do not outlive it (issue 32, item 13).

Under EP 3 a killed raylet turned health NOT_SERVING, correctly, but the three ray::Worker processes (1.1 GB
each) lived on until the server was stopped. The guard (engine/cluster/ray_guard.py) now watches the raylet
while the server lives and stops the instance's other processes once it is gone. First with stand-in
processes (named like Ray's, each naming the temp dir on its command line as Ray's do), then with a real
local Ray and an actor.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from moelink.engine.cluster import ray_guard

from tests.helpers.waits import wait_until

_SLEEP = "import sys, time; time.sleep(600)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_guard_stops_the_workers_when_the_raylet_dies():
    temp_dir = tempfile.mkdtemp(prefix="mlguard-", dir="/tmp")
    # argv[0] is what Ray's processes are called; the temp dir on the command line ties them to this instance.
    procs = {name: subprocess.Popen([name, "-c", _SLEEP, temp_dir], executable=sys.executable)
             for name in ("raylet", "ray::Worker-1", "ray::Worker-2", "gcs_server")}
    other = subprocess.Popen(["ray::Worker-other", "-c", _SLEEP], executable=sys.executable)  # not this instance
    guard = subprocess.Popen([sys.executable, ray_guard.__file__, temp_dir, str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: ray_guard.raylet_of(temp_dir) == procs["raylet"].pid, 10, "the raylet to be found")
        time.sleep(ray_guard._RAYLET_LOOKUP_S + 1.0)  # the guard has found it too
        assert all(_alive(p.pid) for p in procs.values())
        procs["raylet"].kill()
        procs["raylet"].wait(10)
        wait_until(lambda: not any(_alive(p.pid) for p in procs.values()), 15,
                   "the instance's other processes to be stopped")
        assert _alive(other.pid) and guard.poll() is None and os.path.isdir(temp_dir)  # the server still runs
        guard.stdin.close()  # the server exits: the guard removes the dir and ends
        assert guard.wait(15) == 0
        assert not os.path.exists(temp_dir)
    finally:
        for p in [*procs.values(), other]:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        if guard.poll() is None:
            guard.kill()
            guard.wait(10)


# A Ray worker whose raylet is gone, as seen on a loaded 2-core machine: SIGTERM makes it close its log file
# (the only thing tying it to the instance's folder) and then wait on the dead raylet instead of exiting.
_WORKER_CLOSING_ITS_LOG = """
import os, signal, time
log = open(os.environ["GUARD_TEST_DIR"] + "/worker.log", "w")  # not on the command line: the file is the only tie
def on_term(*_):
    log.close()
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def _guard(temp_dir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, ray_guard.__file__, temp_dir, str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_a_worker_that_closes_its_files_on_sigterm_is_still_killed():
    """The sweep SIGKILLs what it SIGTERMed by identity, not only what still has files in the folder."""
    temp_dir = tempfile.mkdtemp(prefix="mlguard-", dir="/tmp")
    worker = subprocess.Popen(["ray::Worker-1", "-c", _WORKER_CLOSING_ITS_LOG], executable=sys.executable,
                              stdout=subprocess.PIPE, env={**os.environ, "GUARD_TEST_DIR": temp_dir})
    try:
        assert worker.stdout.readline().strip() == b"ready"
        assert ray_guard.processes_using(temp_dir) == [worker.pid]
        ray_guard.stop_processes(temp_dir, grace_s=0.3)
        wait_until(lambda: not _alive(worker.pid), 10, "the worker to be killed")
    finally:
        _stop([worker])


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_raylet_named_by_the_server_is_watched_from_that_moment():
    """LocalRay names the raylet on the guard's stdin once Ray is up: a raylet the guard's own /proc scan cannot
    see (here: nothing ties the stand-in to the folder) and that dies at once is still seen to die."""
    temp_dir = tempfile.mkdtemp(prefix="mlguard-", dir="/tmp")
    raylet = subprocess.Popen(["raylet", "-c", _SLEEP], executable=sys.executable)
    workers = [subprocess.Popen([f"ray::Worker-{i}", "-c", _SLEEP, temp_dir], executable=sys.executable)
               for i in range(2)]
    guard = _guard(temp_dir)
    try:
        guard.stdin.write(f"raylet {raylet.pid}\n".encode())
        guard.stdin.flush()
        time.sleep(1.0)  # the guard has read the line (it polls its stdin every 0.5 s)
        raylet.kill()
        raylet.wait(10)
        wait_until(lambda: not any(_alive(w.pid) for w in workers), 15, "the workers to be stopped")
        assert guard.poll() is None
        guard.stdin.close()
        assert guard.wait(15) == 0 and not os.path.exists(temp_dir)
    finally:
        _stop([raylet, *workers, guard])


def _raylet(temp_dir: str):
    """Found here without the guard's helper, so that this test also runs against code without it."""
    for pid in ray_guard.processes_using(temp_dir, (os.getpid(),)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.path.basename(f.read().split(b"\0", 1)[0]) == b"raylet":
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_real_raylet_killed_takes_its_workers_with_it():
    ray = pytest.importorskip("ray")
    from moelink.engine.cluster.ray_runtime import LocalRay

    local = LocalRay(num_cpus=2)
    try:
        @ray.remote
        class Holder:
            def pid(self):
                return os.getpid()

        holders = [Holder.remote() for _ in range(2)]
        workers = ray.get([h.pid.remote() for h in holders], timeout=60)
        raylet = wait_until(lambda: _raylet(local.temp_dir), 20, "the raylet")
        os.kill(raylet, signal.SIGKILL)
        wait_until(lambda: not any(_alive(pid) for pid in workers), 30, "the actors' worker processes to end")
    finally:
        local.close()
