"""Nothing binds wider than asked: deploy/ray scripts honour a loopback address, docs keep smg's metrics local.

The Ray head test starts a real `ray start --head` through deploy/ray/start_head.sh on 127.0.0.1
(a free port, a temp dir of its own) and looks at every socket its processes listen on; the
head is killed by process group (and whatever still uses its folder, by PID), and its folder removed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.local_ray import remove_ray_dir
from tests.helpers.net import free_port
from tests.helpers.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = shutil.which("ray", path=str(VENV_BIN)) or shutil.which("ray")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MOELINK_MASTER_ADDR", "RAY_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return {**env, **extra}


def test_smg_commands_keep_the_gateway_metrics_on_loopback():
    """smg serves Prometheus metrics on 0.0.0.0:29000 unless told otherwise."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md", ROOT / "Makefile"]
    found = 0
    for path in files:
        # A shell command may continue over lines ending in a backslash: check the whole command.
        for command in path.read_text().replace("\\\n", " ").splitlines():
            if "smg launch" not in command:
                continue
            found += 1
            assert re.search(r"--prometheus-host[ =](127\.0\.0\.1|localhost)\b", command), \
                f"{path.relative_to(ROOT)}: {command.strip()}"
    assert found >= 3


def test_serve_sh_keeps_a_loopback_cluster_on_loopback(tmp_path):
    fake = tmp_path / "fake-moelink"
    fake.write_text("#!/usr/bin/env bash\necho \"RAY=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-} "
                    "MASTER=${MOELINK_MASTER_ADDR:-} ARGS=$*\"\n")
    fake.chmod(0o755)
    run = lambda *args: subprocess.run([str(ROOT / "deploy/ray/serve.sh"), "MODEL", *args], env=_env(MOELINK=str(fake)),  # noqa: E731
                                       capture_output=True, text=True, timeout=30).stdout.strip()
    assert run("--ray-address", "127.0.0.1:6379", "-ep", "2") == \
        "RAY=0 MASTER= ARGS=serve MODEL --ray-address 127.0.0.1:6379 -ep 2"
    assert run("--ray-address=localhost:6379").startswith("RAY=0 ")
    assert run("--ray-address", "10.0.0.1:6379").startswith("RAY= ")


def test_start_worker_refuses_a_loopback_node_address():
    proc = subprocess.run([str(ROOT / "deploy/ray/start_worker.sh"), "--address", "10.0.0.1:6379", "--node-ip",
                           "127.0.0.1"], env=_env(RAY="false"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "loopback" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")
def test_start_head_on_loopback_listens_on_loopback_only(listening):
    from moelink.engine.cluster.ray_guard import processes_using

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="mlhead-", dir="/tmp")  # short: Ray's socket paths
    log = Path(temp_dir + ".log")
    head = subprocess.Popen([str(ROOT / "deploy/ray/start_head.sh"), "--node-ip", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "1", "--temp-dir", temp_dir], env=_env(RAY=RAY),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def started():  # the head is another process: its log is polled
            assert head.poll() is None, log.read_text()[-3000:]
            return "Ray runtime started" in log.read_text()

        wait_until(started, 90, "the Ray head to start", interval=0.2, detail=lambda: log.read_text()[-3000:])
        text = log.read_text()
        assert "Local node IP: 127.0.0.1" in text, text[-3000:]
        assert listening(port) == {("127.0.0.1", port)}, "the GCS port must listen on loopback only"
        # Every server of every process of this head: GCS, raylet, agents, client server, metrics.
        ours = listening(pids=processes_using(temp_dir))
        assert ours and all(addr == "127.0.0.1" for addr, _ in ours), sorted(ours)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # the head's session: ray start, GCS, raylet
            head.wait(10)
        remove_ray_dir(temp_dir)  # kills (by PID) anything of this head that left its process group
        log.unlink(missing_ok=True)
