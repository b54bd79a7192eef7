"""The managed smg's control plane is nobody's but moelink's (issue 32, item 1).

Before: smg's admin routes were relayed by the HTTP front like any request, so with no --api-key anyone who
reached the port could `POST /workers` (a rogue worker then got other users' prompts) or `DELETE` moelink's
own worker (HTTP 503 for good while every health check said SERVING). Now the front relays the OpenAI API
and the probes only, smg's control plane asks for an admin key made at start (also on smg's own loopback
port), and a worker smg no longer lists is registered again. Everything binds 127.0.0.1.
"""
from __future__ import annotations

import json
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess
from tests.helpers.net import free_port, listening
from tests.helpers.smg_gateway import http_request, smg_executable
from tests.helpers.waits import wait_until

SERVED = "tiny-moe"
_API_LINE = r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 \(smg gateway pid (\d+); its metrics on " \
            r"http://127\.0\.0\.1:(\d+)/metrics\)"
CHAT = dict(model=SERVED, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def keyless_http(model_path):
    """`moelink serve --http-port` without --api-key (the default): its HTTP port, smg's pid and smg's own
    loopback HTTP port."""
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    srv = ServerProcess(model_path, ENGINE_FLAGS + ["--served-model-name", SERVED, "--http-port", str(free_port())])
    try:
        m = srv.wait_for_line(_API_LINE, 60, "the OpenAI API line")
        port, smg_pid, smg_metrics = int(m.group(1)), int(m.group(2)), int(m.group(3))
        smg_ports = {p for _, p in listening(pids=[smg_pid])} - {smg_metrics}
        assert len(smg_ports) == 1, smg_ports
        yield srv, port, smg_pid, smg_ports.pop()
    finally:
        srv.stop()
        srv.close()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_front_relays_no_control_plane_route(keyless_http):
    _, port, _, _ = keyless_http
    rogue = {"url": "http://127.0.0.1:9"}
    for method, path, body in [("POST", "/workers", rogue), ("GET", "/workers", None),
                               ("DELETE", "/workers/x", None), ("GET", "/get_loads", None),
                               ("POST", "/v1/../workers", rogue),
                               ("POST", "/v1/models/../../workers", rogue), ("POST", "//workers", rogue),
                               ("POST", "/%77orkers", rogue), ("POST", "/wasm", {}), ("POST", "/v1/rl/workers", rogue)]:
        status, raw = http_request(port, method, path, body, timeout=10)
        assert status == 404, (method, path, status, raw[:300])
        assert json.loads(raw) == {"detail": "Not Found"}  # vLLM's (FastAPI's) answer for a path it has no route for
    # smg's /flush_cache is its control plane's: never relayed; the front answers the RL route of that name from
    # the engine itself, refused without --enable-weight-updates (rl_routes.py).
    status, raw = http_request(port, "POST", "/flush_cache", {}, timeout=10)
    assert status == 403 and "--enable-weight-updates" in json.loads(raw)["message"], raw[:300]
    # The OpenAI API itself is relayed as before.
    status, raw = http_request(port, "POST", "/v1/chat/completions", CHAT, timeout=60)
    assert status == 200, raw[:300]
    assert http_request(port, "GET", "/health", timeout=10)[0] == 200


def test_smg_own_port_asks_for_the_admin_key(keyless_http):
    _, _, smg_pid, smg_port = keyless_http
    assert len(_admin_key(smg_pid)) >= 32
    assert http_request(smg_port, "GET", "/workers", timeout=10)[0] == 401
    assert http_request(smg_port, "POST", "/workers", {"url": "http://127.0.0.1:9"}, timeout=10)[0] == 401


def _admin_key(smg_pid: int) -> str:
    """The key as smg got it: in its environment at exec (readable by this user alone), never on its command
    line. (Before the fix there was none, and none was needed: the worker test then shows the lasting 503.)"""
    with open(f"/proc/{smg_pid}/cmdline", "rb") as f:
        cmdline = f.read()
    with open(f"/proc/{smg_pid}/environ", "rb") as f:
        env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    key = env.get(b"MOELINK_GATEWAY_ADMIN_KEY", b"")
    assert key not in cmdline or not key
    return key.decode()


def _http_health(srv) -> int:
    with grpc.insecure_channel(srv.addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="moelink.http.OpenAI"),
                                                    timeout=10).status


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_removed_worker_is_registered_again(keyless_http):
    srv, port, smg_pid, smg_port = keyless_http
    key = {"authorization": f"Bearer {_admin_key(smg_pid)}"}
    status, raw = http_request(smg_port, "GET", "/workers", headers=key, timeout=10)
    assert status == 200, raw[:300]
    ours = json.loads(raw)["workers"]
    assert len(ours) == 1
    # Removed through smg's control plane (by someone with the key, or by smg itself).
    assert http_request(smg_port, "DELETE", f"/workers/{ours[0]['id']}", headers=key, timeout=10)[0] in (200, 202)
    wait_until(lambda: re.search(r"no longer lists moelink's worker", srv.logs()), 30,
               "the supervisor to notice the worker is gone", interval=0.2, detail=lambda: srv.logs()[-3000:])

    def serving_again():
        # smg applies a removal in the background: one queued before the new registration can drop it once
        # more, and the next check registers it again. So: all three at once, once it settles.
        return (http_request(port, "POST", "/v1/chat/completions", CHAT, timeout=60)[0] == 200
                and http_request(port, "GET", "/health", timeout=10)[0] == 200
                and _http_health(srv) == health_pb2.HealthCheckResponse.SERVING)

    wait_until(serving_again, 60, "the OpenAI API to serve again", interval=0.5, detail=lambda: srv.logs()[-3000:])


def test_public_paths():
    from moelink.engine.server.gateway.http_front import public_path

    assert public_path(b"/v1/chat/completions?x=1") == "/v1/chat/completions"
    assert public_path(b"/v1/models/tiny-moe") == "/v1/models/tiny-moe"
    assert public_path(b"/health") == "/health"
    for bad in (b"/workers", b"/v1/../workers", b"http://127.0.0.1/workers", b"*", b"/v1/chat/completions/../..",
                b"/v1/models%2f..%2fworkers", b"/v1//models", b"/v1/modelsx", b"/get_loads"):
        assert public_path(bad) is None, bad
