"""`GET /metrics` on the OpenAI HTTP port, where `vllm serve` serves Prometheus.

The body is moelink's registry (its own series and vLLM's names beside them: engine/core/vllm_metrics.py) followed
by the managed smg gateway's own metrics (HTTP request counts and latencies, `smg_*`), which smg serves on a
loopback port of its own (`--http-metrics-port`): one scrape target for both. The two sets share no name, so the
texts are concatenated. smg being down (it is restarted) costs its part only, said in a comment line: the
engine's series still answer.
"""
from __future__ import annotations

import asyncio
import http.client
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

SMG_TIMEOUT_S = 2.0  # smg answers its scrape in milliseconds; a stuck one must not hold the engine's series
CONTENT_TYPE = CONTENT_TYPE_LATEST  # "text/plain; version=0.0.4; charset=utf-8": Prometheus' text format


class HttpMetrics:
    """The /metrics body: `registry` (may be None) and, when `smg_port()` names one, smg's metrics port."""

    def __init__(self, registry, smg_port: Callable[[], Optional[int]] = lambda: None):
        self.registry = registry
        self.smg_port = smg_port

    async def body(self) -> bytes:
        ours = b"" if self.registry is None else await asyncio.to_thread(generate_latest, self.registry)
        port = self.smg_port()
        theirs = b"" if port is None else await asyncio.to_thread(_scrape, port)
        return ours + theirs


def _scrape(port: int) -> bytes:
    """smg's Prometheus text from its loopback port, or one comment line saying why not."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SMG_TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            return f"# the smg gateway's metrics answered HTTP {resp.status}\n".encode()
        return text if text.endswith(b"\n") or not text else text + b"\n"
    except OSError as exc:
        return f"# the smg gateway's metrics are unavailable now ({type(exc).__name__})\n".encode()
    finally:
        conn.close()
