"""gRPC servers for the tests: `moelink serve` subprocesses, in-process servers, typed stubs, pool checks.

Everything started here is stopped by whoever started it (the fixtures in tests/server/conftest.py, the
EP watchdog tests), by PID, with bounded waits; every server binds 127.0.0.1 on a port chosen at run
time (`--port 0`, read back from the server's ready line).
"""
from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc

from .waits import WaitTimeout
from tests.helpers import zygote

MODEL = "qwen3_e6k3"
ENGINE_KW = dict(dtype="float32", max_model_len=512, num_kv_blocks=4096)
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "4096"]
SERVED_NAME = "tiny-moe"
# The shared server takes at most this many bytes per message (the message-size test sends more).
MAX_MESSAGE_SIZE = 1 << 20
READY_TIMEOUT_S = 90.0


@dataclass
class CallDetails(grpc.HandlerCallDetails):
    """grpc.HandlerCallDetails as a server interceptor's intercept_service(continuation, details) gets it."""

    method: str
    invocation_metadata: tuple = ()


def child_env(extra: dict | None = None) -> dict:
    """os.environ with `extra` over it, for a `python -m moelink...` child the zygote can fork (tests/helpers/zygote.py
    compares only what an import reads, torch's default inductor cache dir aside)."""
    return {**os.environ, **(extra or {})}


class ServerProcess:
    """`moelink serve MODEL ... --port 0` in a subprocess; stderr goes to a temp file for post-mortems."""

    def __init__(self, model: str, args: list[str], env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="moelink-serve-", suffix=".log", delete=False)
        # gRPC only unless a test asks for the managed HTTP gateway (its default port 8000 is shared).
        http = [] if "--http-port" in args or "--no-http" in args else ["--no-http"]
        cmd = [sys.executable, "-m", "moelink.engine.api.cli", "serve", model, "--host", "127.0.0.1", "--port", "0",
               *http, *args]
        # One intra-op thread: the tiny model gains nothing from more, and on a 2-core machine the
        # server, the test process (the offline oracle) and smg would otherwise fight over cores.
        env = child_env({"OMP_NUM_THREADS": "1", **(env or {})})
        # Forked from the test zygote (tests/helpers/zygote.py: torch imported once, not per server), else exec'd.
        self.proc = zygote.popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.pid = self.proc.pid
        self.stdout_lines: list[str] = []
        self._lines = threading.Condition()  # notified for every stdout line and at EOF
        self._stdout_closed = False
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
            with self._lines:
                self.stdout_lines.append(line)
                self._lines.notify_all()
        with self._lines:
            self._stdout_closed = True
            self._lines.notify_all()

    def wait_for_line(self, pattern: str, timeout: float, what: str) -> re.Match:
        """The first stdout line matching `pattern` (re.match), waiting for the server to print it."""
        rx = re.compile(pattern)

        def found():
            return next((m for m in map(rx.match, self.stdout_lines) if m), None)

        with self._lines:
            m = self._lines.wait_for(lambda: found() or self._stdout_closed, timeout)
        if isinstance(m, re.Match):
            return m
        raise WaitTimeout(f"{what}: no stdout line matches {pattern!r} "
                          f"({'the server closed its stdout' if m else f'after {timeout:g} s'}):\n"
                          + "".join(self.stdout_lines))

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def finished_line(self, prompt_tokens: int) -> str:
        """The server's last request-log line for a finished request of `prompt_tokens` prompt tokens (a PD decode
        server's says what it loaded: `cached_tokens=`; smg 1.13 reports the prefill leg's usage instead)."""
        lines = [ln for ln in self.logs().splitlines()
                 if "request finished" in ln and f"prompt_tokens={prompt_tokens} " in ln]
        assert lines, f"no finished request of {prompt_tokens} prompt tokens in the server's log"
        return lines[-1]

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

    def __init__(self, model: str, engine_kw: dict, engine_shutdown_timeout: float = 10.0, **config_kw):
        from moelink.engine import AsyncEngine, EngineArgs
        from moelink.engine.server.config import ServerConfig
        from moelink.engine.server.server import MoelinkServer

        self.engine_shutdown_timeout = engine_shutdown_timeout
        metrics = None
        if config_kw.get("metrics_port") is not None:  # the engine takes its metrics sink when it is made
            from moelink.engine.core.metrics import EngineMetrics

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
            self.engine.shutdown(timeout=self.engine_shutdown_timeout)
            self.loop.close()


@dataclass
class Stubs:
    """Stubs of every service a moelink server offers on one channel, with their message modules."""

    channel: Any
    pb: ModuleType  # moelink.v1 messages
    native: Any  # moelink.v1.Generation
    vpb: ModuleType  # vllm.grpc.engine messages
    vllm: Any  # vllm.grpc.engine.VllmEngine
    hpb: ModuleType  # grpc.health.v1 messages
    health: Any  # grpc.health.v1.Health


def make_stubs(channel) -> Stubs:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

    from moelink.engine.server.gen import moelink_v1_pb2, moelink_v1_pb2_grpc

    return Stubs(
        channel=channel, pb=moelink_v1_pb2, native=moelink_v1_pb2_grpc.GenerationStub(channel),
        vpb=vllm_engine_pb2, vllm=vllm_engine_pb2_grpc.VllmEngineStub(channel),
        hpb=health_pb2, health=health_pb2_grpc.HealthStub(channel))


def pool_is_free(native_stub, pb, metadata=None):
    """ServerInfo when nothing runs, nothing waits and every KV block is free; else None."""
    info = native_stub.ServerInfo(pb.ServerInfoRequest(), timeout=5, metadata=metadata)
    free = (info.num_running == 0 and info.num_waiting == 0 and info.active_requests == 0
            and info.queued_requests == 0 and info.num_free_blocks == info.num_total_blocks)
    return info if free else None


def wait_health(health_stub, hpb, service: str, want: int, timeout: float) -> float:
    """Watch `service`'s health (the Health.Watch stream: the server pushes every change) until it is
    `want`; returns the seconds that took. WaitTimeout when it is not within `timeout` s."""
    import grpc

    t0 = time.monotonic()
    stream = health_stub.Watch(hpb.HealthCheckRequest(service=service), timeout=timeout)
    seen = []
    try:
        for msg in stream:
            seen.append(hpb.HealthCheckResponse.ServingStatus.Name(msg.status))
            if msg.status == want:
                return time.monotonic() - t0
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()
    raise WaitTimeout(f"health of {service!r} not {hpb.HealthCheckResponse.ServingStatus.Name(want)} "
                      f"within {timeout:g} s (seen: {seen})")
