"""A real two-node Ray cluster from deploy/ray/, one test host per network namespace, EP 2 across them.

Each node is a network namespace made here (`ip netns add`, a veth pair,
10.231.0.1 / 10.231.0.2): the head in one, the worker node in the other, with
different resources. `moelink serve --expert-parallel-size 2` runs against
the cluster with one rank per node (each node offers one CPU bundle), a
request goes through it, and everything is torn down by PID.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers.local_ray import RAY_STARTED, remove_ray_dir, stop_process_group
from tests.helpers.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"


def _can_make_netns() -> str | None:
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = f"mlprobe{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return "this sandbox does not allow `ip netns add`"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


SKIP = _can_make_netns()


def _run(*cmd, check=True):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


class TwoHosts:
    """Two namespaces joined by a veth pair; removed on close."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.head, self.worker = f"mlhead{tag}", f"mlwork{tag}"
        veth_h, veth_w = f"vh{tag}", f"vw{tag}"
        for ns in (self.head, self.worker):
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_w)
        for ns, dev, ip in ((self.head, veth_h, HEAD_IP), (self.worker, veth_w, WORKER_IP)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def popen(self, ns, args, log: Path, env):
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, ns, args, env, timeout=120):
        return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def close(self):
        for ns in (self.head, self.worker):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _stop(proc: subprocess.Popen | None, timeout=60):
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _wait_for(pred, timeout: float, what: str, logs=()):
    # The cluster's processes run in other network namespaces: polled, with their logs on a timeout.
    wait_until(pred, timeout, what, interval=0.2,
               detail=lambda: "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in logs if p.exists()))


def _once_logged(log: Path, line: str, ask, every: float = 5.0):
    """A predicate for _wait_for that calls `ask` (a `ray status` or a client: a Python process each, ~0.6 s of
    CPU) at most once a second after `log` shows `line`, and at most every `every` s before (a process that
    logs otherwise is still seen, later)."""
    asked = [time.monotonic()]

    def pred():
        now = time.monotonic()
        logged = log.exists() and line in log.read_text()
        if now - asked[0] < (1.0 if logged else every):
            return False
        asked[0] = now
        return ask()

    return pred


@pytest.mark.slow
@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_serve_ep2_across_two_ray_nodes(tiny_model, tmp_path):
    model = tiny_model("mixtral_e5k3")
    from moelink.engine import LLM, SamplingParams

    want = LLM(model, dtype="float32").generate(["hello moe"], SamplingParams(temperature=0, max_tokens=6,
                                                                                 ignore_eos=True), use_tqdm=False)
    env = {k: v for k, v in os.environ.items() if k not in ("MOELINK_MASTER_ADDR", "RAY_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    # (The one-node tests' RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would refuse a second node.)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    # A cluster reachable beyond loopback uses Ray's token auth: one shared secret for every process.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["PYTHONUNBUFFERED"] = "1"  # `ray start`'s RAY_STARTED line reaches the node's log when printed
    # Each node keeps its files in a short temp dir of its own (Ray's socket paths must stay under 107 bytes;
    # never /tmp/ray), removed at the end with anything still using it.
    ray_tmp = tempfile.mkdtemp(prefix="mlray", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="mlrayw", dir="/tmp")
    hosts = TwoHosts()
    head = worker = server = None
    port = 6380
    address = f"{HEAD_IP}:{port}"
    status = lambda: hosts.run(hosts.head, [str(VENV_BIN / "ray"), "status", "--address", address], env, timeout=60)
    try:
        head = hosts.popen(hosts.head, [str(ROOT / "deploy/ray/start_head.sh"), "--node-ip", HEAD_IP, "--port", str(port),
                                        "--num-cpus", "1", "--resources", '{"moelink_head": 1}',
                                        "--temp-dir", ray_tmp], tmp_path / "head.log", env)
        _wait_for(_once_logged(tmp_path / "head.log", RAY_STARTED, lambda: status().returncode == 0), 90,
                  "the Ray head", [tmp_path / "head.log"])
        worker = hosts.popen(hosts.worker, [str(ROOT / "deploy/ray/start_worker.sh"), "--address", address,
                                            "--node-ip", WORKER_IP, "--num-cpus", "1",
                                            "--resources", '{"moelink_worker": 1}', "--temp-dir", worker_tmp],
                             tmp_path / "worker.log", env)
        _wait_for(_once_logged(tmp_path / "worker.log", RAY_STARTED, lambda: "moelink_worker" in status().stdout),
                  90, "the worker node to join",
                  [tmp_path / "head.log", tmp_path / "worker.log"])
        server = hosts.popen(hosts.head, [str(ROOT / "deploy/ray/serve.sh"), model, "--ray-address", address,
                                          "--expert-parallel-size", "2", "--dtype", "float32",
                                          "--host", "127.0.0.1", "--port", "50061"], tmp_path / "serve.log", env)
        client = [sys.executable, "-m", "moelink.engine.server.client", "--target", "127.0.0.1:50061",
                  "--max-tokens", "6", "--timeout", "60", "hello moe"]
        result = {}

        def served():
            if server.poll() is not None:
                raise AssertionError("moelink serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            proc = hosts.run(hosts.head, client, env, timeout=90)
            result["out"] = proc.stdout + proc.stderr
            return proc.returncode == 0 and "finish_reason=length" in proc.stdout

        def exited():
            if server.poll() is not None:
                raise AssertionError("moelink serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            return False

        # The client is asked once the server printed its ready line ("moelink: serving ..."); an exit at once.
        ask = _once_logged(tmp_path / "serve.log", "moelink: serving", served)
        _wait_for(lambda: exited() or ask(), 180, "a request served through the two-node cluster",
                  [tmp_path / "serve.log", tmp_path / "head.log", tmp_path / "worker.log"])
        assert want[0].outputs[0].text in result["out"]
        # Both nodes gave one CPU: the 2-rank placement group had to span them.
        nodes = status().stdout
        assert "moelink_head" in nodes and "moelink_worker" in nodes
    finally:
        _stop(server)
        stop_process_group(worker)  # Ray nodes: a short grace, then the group is killed (STOP_GRACE_S says why)
        stop_process_group(head)
        hosts.close()
        remove_ray_dir(ray_tmp)
        remove_ray_dir(worker_tmp)
