"""Issue 76 item 4 (second half): the engine loop died (an adapter's scale overflowed a step), every request of every
user then answered 503, while the HTTP probes /health, /readiness and /ping kept answering 200 (relayed to smg, which
still saw its worker's port): a load balancer kept sending traffic to a dead replica. gRPC health said NOT_SERVING.

Now the front asks the engine at each probe (gateway/health.py `engine_down`): once it is dead, /health,
/health_generate, /readiness, /ping and /liveness answer 503 naming why, at once; a gateway restart still leaves
/liveness alone. A stand-in smg answers 200 to everything: what the front relayed before. No engine, no server."""
from __future__ import annotations

import asyncio

from moelink.engine.server.gateway.health import engine_down
from moelink.engine.server.gateway.http_front import HttpFront

from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request

PROBES = ("/health", "/health_generate", "/readiness", "/ping", "/liveness")


class _Engine:
    """AsyncEngine's health as the front reads it."""

    def __init__(self):
        self.dead_error = None

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None


async def _fake_smg(port: int) -> asyncio.base_events.Server:
    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                     b"connection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port)


def _probe_all(engine, not_serving=lambda: None) -> tuple[dict, dict]:
    """({probe: status} alive, {probe: (status, body)} after the engine died), and /v1/models after."""
    async def scenario():
        up = free_port()
        smg = await _fake_smg(up)
        front = HttpFront("127.0.0.1", free_port(), up, not_serving=not_serving, engine_down=engine_down(engine))
        await front.start()
        try:
            alive = {p: (await asyncio.to_thread(http_request, front.port, "GET", p))[0] for p in PROBES}
            engine.dead_error = RuntimeError("value cannot be converted to type float without overflow")
            dead = {p: await asyncio.to_thread(http_request, front.port, "GET", p) for p in PROBES + ("/v1/models",)}
            return alive, dead
        finally:
            await front.stop()
            smg.close()
            await smg.wait_closed()

    return asyncio.run(scenario())


def test_every_http_probe_answers_503_at_once_when_the_engine_dies():
    alive, dead = _probe_all(_Engine())
    assert alive == {p: 200 for p in PROBES}, alive
    for p in PROBES:
        status, body = dead[p]
        assert status == 503, (p, status, body)
        assert b"the engine is not running" in body and b"without overflow" in body, body
    assert dead["/v1/models"][0] == 200  # not a probe: relayed as before (smg answers the API's own errors)


def test_a_gateway_restart_leaves_liveness_alone():
    """smg down and being restarted: the readiness probes say 503 (the supervisor brings it back), /liveness 200:
    restarting the replica would not help."""
    async def scenario():
        up = free_port()
        smg = await _fake_smg(up)
        front = HttpFront("127.0.0.1", free_port(), up, not_serving=lambda: "smg is being restarted",
                          engine_down=engine_down(_Engine()))
        await front.start()
        try:
            return {p: (await asyncio.to_thread(http_request, front.port, "GET", p))[0] for p in PROBES}
        finally:
            await front.stop()
            smg.close()
            await smg.wait_closed()

    got = asyncio.run(scenario())
    assert got == {"/health": 503, "/health_generate": 503, "/readiness": 503, "/ping": 503, "/liveness": 200}, got


def test_the_managed_front_is_given_the_engines_health(monkeypatch):
    """start_managed_gateway wires the engine's health into its front (the wiring the 200s lacked)."""
    from moelink.engine.server.config import ServerConfig
    from moelink.engine.server.gateway import chat_route, generate_route, managed, rl_routes, vllm_routes

    seen = {}

    class _Front:
        def __init__(self, *args, **kw):
            seen.update(kw)

        async def start(self):
            raise OSError(98, "in use")  # ends the start here: only the front's construction is looked at

    class _Serving:
        from moelink.engine.server.limits import RequestLimits

        engine = _Engine()
        limits = RequestLimits()
        abort_all = None  # Serving.abort_all: what an update's abort_all_requests calls

    monkeypatch.setattr(managed, "HttpFront", _Front)
    for module, name in ((vllm_routes, "VllmRoutes"), (rl_routes, "RlRoutes"), (rl_routes, "ChainedRoutes"),
                         (generate_route, "GenerateRoute"), (chat_route, "ChatRoute")):
        monkeypatch.setattr(module, name, lambda *a, **k: None)
    monkeypatch.setattr(_Engine, "takes_control_calls", False, raising=False)
    config = ServerConfig(http_port=free_port())
    try:
        asyncio.run(managed.start_managed_gateway(config, 1, None, serving=_Serving()))
    except managed.GatewayError:
        pass
    probe = seen["engine_down"]
    assert probe() is None
    _Serving.engine.dead_error = RuntimeError("the loop died")
    assert "the loop died" in probe()
