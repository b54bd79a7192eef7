"""Fixtures for the gRPC server tests: `moelink serve` subprocesses, in-process servers, stubs, the offline oracle.

Everything a test starts is stopped by the fixture that started it, by PID,
with bounded waits; every server binds 127.0.0.1 on a port chosen at run time
(`--port 0`, read back from the server's ready line). Helpers are fixtures,
not imports, so the tests work under any pytest import mode.
"""
from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

MODEL = "qwen3_e6k3"
ENGINE_KW = dict(dtype="float32", max_model_len=512, num_kv_blocks=4096)
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "4096"]
SERVED_NAME = "tiny-moe"
# The shared server takes at most this many bytes per message (the message-size test sends more).
MAX_MESSAGE_SIZE = 1 << 20
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`moelink serve MODEL ... --port 0` in a subprocess; stderr goes to a temp file for post-mortems."""

    def __init__(self, model: str, args: list[str], env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="moelink-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "moelink.engine.cli", "serve", model, "--host", "127.0.0.1", "--port", "0", *args]
        # One intra-op thread: the tiny model gains nothing from more, and on a 2-core machine the
        # server, the test process (the offline oracle) and smg would otherwise fight over cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.pid = self.proc.pid
        self.stdout_lines: list[str] = []
        self.port = self._wait_ready()
        self.addr = f"127.0.0.1:{self.port}"
        # Keep draining stdout so the server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain_stdout, daemon=True)
        self._reader.start()

    def _wait_ready(self) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = self.proc.stdout.readline()
                    if line:
                        self.stdout_lines.append(line)
                    if line.startswith("moelink: serving"):
                        return int(line.split(" on ", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
                if self.proc.poll() is not None:
                    break
        finally:
            sel.close()
        self.kill()
        raise RuntimeError(f"moelink serve did not become ready (exit {self.proc.returncode}):\n{self.logs()[-4000:]}")

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line)

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def signal(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


class ThreadServer:
    """A MoelinkServer with its own AsyncEngine, on an event loop in a background thread of the test process."""

    def __init__(self, model: str, engine_kw: dict, **config_kw):
        from moelink.engine import AsyncEngine, EngineArgs
        from moelink.engine.server.config import ServerConfig
        from moelink.engine.server.server import MoelinkServer

        metrics = None
        if config_kw.get("metrics_port") is not None:  # the engine takes its metrics sink when it is made
            from moelink.engine.metrics import EngineMetrics

            metrics = EngineMetrics()
        self.engine = AsyncEngine.from_engine_args(EngineArgs(model=model, **engine_kw), metrics=metrics)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-server", daemon=True)
        self.thread.start()
        self.server = MoelinkServer(self.engine, ServerConfig(host="127.0.0.1", port=0, **config_kw))
        self.port = self.call(self.server.start())
        self.addr = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.engine.shutdown()
            self.loop.close()


def _stubs(channel) -> SimpleNamespace:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

    from moelink.engine.server.gen import moelink_v1_pb2, moelink_v1_pb2_grpc

    return SimpleNamespace(
        channel=channel, pb=moelink_v1_pb2, native=moelink_v1_pb2_grpc.GenerationStub(channel),
        vpb=vllm_engine_pb2, vllm=vllm_engine_pb2_grpc.VllmEngineStub(channel),
        hpb=health_pb2, health=health_pb2_grpc.HealthStub(channel))


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05):
    """Poll `pred()` until it returns something truthy; returns it (or the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def pool_is_free(native_stub, pb, metadata=None):
    """ServerInfo when nothing runs, nothing waits and every KV block is free; else None."""
    info = native_stub.ServerInfo(pb.ServerInfoRequest(), timeout=5, metadata=metadata)
    free = (info.num_running == 0 and info.num_waiting == 0 and info.active_requests == 0
            and info.queued_requests == 0 and info.num_free_blocks == info.num_total_blocks)
    return info if free else None


@pytest.fixture(scope="session")
def model_path(tiny_model):
    return tiny_model(MODEL)


@pytest.fixture(scope="session")
def server(model_path):
    """The shared `moelink serve` (plaintext, no key) most tests talk to."""
    srv = ServerProcess(model_path, ENGINE_FLAGS + ["--served-model-name", SERVED_NAME,
                                                    "--max-message-size", str(MAX_MESSAGE_SIZE)])
    yield srv
    rc = srv.stop()
    try:
        assert rc == 0, f"server exited with {rc}:\n{srv.logs()[-4000:]}"
    finally:
        srv.close()


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(server.addr, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stubs(channel):
    return _stubs(channel)


@pytest.fixture(scope="session")
def offline(model_path):
    """The oracle: the offline LLM API with the server's engine options."""
    from moelink.engine import LLM

    return LLM(model_path, **ENGINE_KW)


@pytest.fixture
def util():
    """Helpers as a fixture: wait_until, pool_is_free, make_stubs, free_port."""
    return SimpleNamespace(wait_until=wait_until, pool_is_free=pool_is_free, make_stubs=_stubs, free_port=free_port)


@pytest.fixture
def spawn_server(model_path):
    """spawn_server(*extra_flags) → a running ServerProcess; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def spawn(*args: str, env: dict | None = None) -> ServerProcess:
        srv = ServerProcess(model_path, ENGINE_FLAGS + list(args), env=env)
        started.append(srv)
        return srv

    yield spawn
    for srv in started:
        srv.close()


@pytest.fixture
def thread_server(model_path):
    """thread_server(engine_kw=..., **ServerConfig fields) → an in-process server; all are closed at teardown."""
    started: list[ThreadServer] = []

    def make(engine_kw: dict | None = None, **config_kw) -> ThreadServer:
        srv = ThreadServer(model_path, {**ENGINE_KW, **(engine_kw or {})}, **config_kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.close()
