"""Fixtures for the gRPC server tests: `moelink serve` subprocesses, in-process servers, stubs, the offline oracle.

The servers themselves are in tests/helpers/grpc_server.py. Everything a test starts is stopped by the
fixture that started it, by PID, with bounded waits.
"""
from __future__ import annotations

import grpc
import pytest

from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable

from tests.helpers.grpc_server import (
    ENGINE_FLAGS, ENGINE_KW, MAX_MESSAGE_SIZE, MODEL, SERVED_NAME, ServerProcess, Stubs, ThreadServer, make_stubs,
)


@pytest.fixture(scope="session")
def model_path(tiny_model):
    return tiny_model(MODEL)


@pytest.fixture(scope="session")
def server(model_path):
    """The shared `moelink serve` (plaintext, no key) most tests talk to."""
    srv = ServerProcess(model_path, ENGINE_FLAGS + ["--served-model-name", SERVED_NAME,
                                                    "--max-message-size", str(MAX_MESSAGE_SIZE),
                                                    "--enable-return-routed-experts"])
    yield srv
    rc = srv.stop()
    try:
        assert rc == 0, f"server exited with {rc}:\n{srv.logs()[-4000:]}"
    finally:
        srv.close()


@pytest.fixture(scope="session")
def openai_server(model_path):
    """(server, HTTP port): one `moelink serve --http-port` (its managed smg, no --api-key) for the HTTP tests that
    only send requests to it (test_http_front.py, test_http_metrics.py: the same flags, one start instead of two;
    their modules are in xdist group `openai_server`, so that one worker starts it for both). A test that changes the server (a worker removed, smg killed) starts
    its own."""
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    srv = ServerProcess(model_path, ENGINE_FLAGS + ["--served-model-name", SERVED_NAME, "--http-port", str(free_port())])
    try:
        m = srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 ", 60, "the OpenAI API line")
        yield srv, int(m.group(1))
    finally:
        srv.stop()
        srv.close()


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(server.addr, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stubs(channel) -> Stubs:
    return make_stubs(channel)


@pytest.fixture(scope="session")
def offline(model_path):
    """The oracle: the offline LLM API with the server's engine options."""
    from moelink.engine import LLM

    return LLM(model_path, **ENGINE_KW)


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
