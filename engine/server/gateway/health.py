"""The managed gateway's state where operators look: gRPC health and Prometheus.

When smg keeps dying (or lists no worker of ours) the OpenAI API is down while gRPC still serves; a
probe of the gRPC port alone would say all is well. So the HTTP face has a health name of its own,
HTTP_SERVICE ("moelink.http.OpenAI": SERVING while the gateway serves, NOT_SERVING while it is down or
lost its worker), and the server's --metrics-port shows `moelink_http_gateway_up`, the gateway's crashes
and the worker's re-registrations. Liveness ("") and the gRPC services' readiness are left alone: gRPC
still serves, and the supervisor keeps bringing the gateway back.

The engine's death is another matter (its loop died, a rank was lost, a step hung): nothing brings it back but a
restart, so every probe says so at once, on both faces: gRPC health goes NOT_SERVING (server.py `_watch_engine`) and
the HTTP front answers 503 to /health, /health_generate, /readiness, /ping and /liveness (`engine_down`, asked at
each probe: no poll between the death and the answer). /liveness too, unlike a gateway restart: a load balancer
must stop sending traffic to the replica and an orchestrator restart it, as vLLM's /health answers 503 once its
engine is dead.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from grpc_health.v1 import health_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

HTTP_SERVICE = "moelink.http.OpenAI"
POLL_S = 0.5


def engine_down(engine) -> Callable[[], Optional[str]]:
    """What the HTTP front asks at each probe: why `engine` (an AsyncEngine) cannot serve any more, or None while
    it can."""
    def reason() -> Optional[str]:
        if engine.is_healthy:
            return None
        return f"the engine is not running ({engine.dead_error}); retry on another replica."
    return reason


async def watch_gateway(gateway, health_servicer) -> None:
    """Mirror `gateway.not_serving()` into the health status of HTTP_SERVICE until cancelled."""
    last = None
    while True:
        reason = gateway.not_serving()
        status = health_pb2.HealthCheckResponse.SERVING if reason is None else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            await health_servicer.set(HTTP_SERVICE, status)
            if last is not None:
                logger.warning("the OpenAI API is %s%s", "back" if reason is None else "down: ", reason or "")
            last = status
        await asyncio.sleep(POLL_S)


class GatewayCollector:
    """Prometheus series of the managed gateway, read from its supervisor at scrape time."""

    def __init__(self, gateway):
        self.gateway = gateway

    def collect(self):
        gw = self.gateway
        up = GaugeMetricFamily("moelink_http_gateway_up", "1 while the managed OpenAI gateway (smg) serves, "
                               "0 while it is down or lists no moelink worker.")
        up.add_metric([], 0.0 if gw.not_serving() else 1.0)
        yield up
        yield CounterMetricFamily("moelink_http_gateway_crashes", "Exits of the managed smg gateway it did not "
                                  "ask for.", value=gw.crashes)
        yield CounterMetricFamily("moelink_http_gateway_restarts", "Restarts of the managed smg gateway that "
                                  "served again.", value=gw.restarts)
        yield CounterMetricFamily("moelink_http_gateway_worker_registrations", "Times moelink registered its "
                                  "worker again with smg after smg stopped listing it.",
                                  value=gw.worker_registrations)
