"""A gateway that keeps crashing is retried, never given up on, and its loss is visible (issue 32, item 7).

Before: after the sixth crash the supervisor stopped, HTTP was refused for good, and gRPC health and the
metrics said nothing. Now quick restarts turn into slow ones, `not_serving()` says why meanwhile, the
health name of the HTTP face goes NOT_SERVING, and `moelink_http_gateway_up` drops to 0. Against the
stand-in smg of test_gateway_supervisor.py; everything binds 127.0.0.1, every wait is bounded.
"""
from __future__ import annotations

import pytest

import asyncio
import os

from moelink.engine.server.gateway import supervisor as gw

from tests.server.test_gateway_supervisor import _supervisor, fake  # noqa: F401 (a fixture)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_after_the_quick_restarts_it_keeps_retrying_and_says_the_api_is_down(fake, monkeypatch):  # noqa: F811
    from grpc_health.v1 import health, health_pb2
    from prometheus_client import CollectorRegistry, generate_latest

    from moelink.engine.server.gateway.health import HTTP_SERVICE, GatewayCollector, watch_gateway

    script, mode = fake
    monkeypatch.setattr(gw, "BACKOFF_S", (0.05,))
    monkeypatch.setattr(gw, "MAX_RESTARTS", 1)
    monkeypatch.setattr(gw, "SLOW_BACKOFF_S", (0.2, 0.4))

    class NotSet(Exception):
        pass

    class Context:  # what Check needs of a grpc context: abort() for a name never set
        async def abort(self, code, details=""):
            raise NotSet(code)

    async def status(servicer):
        try:
            return (await servicer.Check(health_pb2.HealthCheckRequest(service=HTTP_SERVICE), Context())).status
        except NotSet:
            return None

    async def until(predicate, what: str, timeout: float = 20.0):
        for _ in range(int(timeout / 0.05)):  # bounded
            if await predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def run():
        sup = _supervisor(script, ready_timeout=10)
        servicer = health.aio.HealthServicer()
        registry = CollectorRegistry()
        registry.register(GatewayCollector(sup))
        await sup.start()
        watch = asyncio.create_task(watch_gateway(sup, servicer))
        try:
            await until(lambda: _async(sup.not_serving() is None), "the gateway to serve")
            await until(lambda: _is(status(servicer), health_pb2.HealthCheckResponse.SERVING), "HTTP health SERVING")
            assert b"moelink_http_gateway_up 1.0" in generate_latest(registry)
            # Every start fails from now on: one quick restart, then the slow retries (several of them).
            mode.write_text("exit")
            os.kill(sup.pid, 9)
            await asyncio.wait_for(sup._watch, 10)
            assert sup._recover is not None and not sup._recover.done()
            assert "not running" in sup.not_serving()
            await until(lambda: _is(status(servicer), health_pb2.HealthCheckResponse.NOT_SERVING),
                        "HTTP health NOT_SERVING")
            text = generate_latest(registry)
            assert b"moelink_http_gateway_up 0.0" in text and sup.crashes >= 2, text  # the kill, the failed restart
            assert f"moelink_http_gateway_crashes_total {sup.crashes:.1f}".encode() in text, text
            await asyncio.sleep(1.0)  # a few slow retries fail
            assert not sup._recover.done() and sup.restarts == 0
            # The cause goes away: a slow retry brings it back, watched as at first.
            mode.write_text("ok")
            await until(lambda: _async(sup.restarts == 1 and sup.not_serving() is None), "the gateway to be back")
            await until(lambda: _is(status(servicer), health_pb2.HealthCheckResponse.SERVING), "HTTP health back")
            assert b"moelink_http_gateway_up 1.0" in generate_latest(registry)
            assert sup._watch is not None and not sup._watch.done()
        finally:
            watch.cancel()
            await sup.stop()

    asyncio.run(run())


async def _async(value):
    return value


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected
