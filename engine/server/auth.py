"""Bearer-token check (`--api-key`) for every RPC except health probes.

Health probes are `grpc.health.v1` and `VllmEngine/HealthCheck` (what the managed
gateway, engine/server/gateway/, and other vLLM clients probe). Without the key, `VllmEngine/HealthCheck`
answers only healthy or not: its message (which can carry the engine's error)
is replaced by a fixed word. Everything else needs the key.
"""
from __future__ import annotations

import hmac
from typing import Iterable

import grpc

from .method_handler import handler_like

HEALTH_PREFIX = "/grpc.health.v1.Health/"
VLLM_HEALTH_CHECK = "/vllm.grpc.engine.VllmEngine/HealthCheck"


def _presented_key(metadata: Iterable[tuple[str, str]]) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


def _deny(handler, message: str):
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: the request stays raw bytes, never parsed. A caller without the key must not make the
    # server parse 30 M token ids on its event loop just to be told UNAUTHENTICATED.
    return handler_like(handler, deny, request_deserializer=None)


def _health_only(handler):
    """The VllmEngine HealthCheck handler for a caller without the key: healthy or not, and nothing else."""
    inner = handler.unary_unary

    async def unary(request, context):
        resp = await inner(request, context)
        return type(resp)(healthy=resp.healthy, message="healthy" if resp.healthy else "not serving")

    return handler_like(handler, unary, handler.request_deserializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` (or `x-api-key: <key>`) metadata; UNAUTHENTICATED otherwise.

    Health checks stay open so load balancers, Kubernetes probes and gateways need no secret.
    """

    def __init__(self, api_key: str):
        self._key = api_key.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        presented = _presented_key(handler_call_details.invocation_metadata)
        valid = presented is not None and hmac.compare_digest(presented.encode(), self._key)
        if valid:
            return handler
        if handler_call_details.method == VLLM_HEALTH_CHECK and handler.unary_unary is not None:
            return _health_only(handler)
        if presented is None:
            return _deny(handler, "missing API key: send metadata 'authorization: Bearer <key>'.")
        return _deny(handler, "invalid API key.")
