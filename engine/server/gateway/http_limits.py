"""What the OpenAI HTTP front (http_front.py) grants one client connection: how many may be open, how long a
request's head and body may take to arrive, how long an answer may wait on a client that does not read it, and how
large a body each route reads. Each is a flag of `moelink serve` and of `moelink http-front`.

Why (issue 95): the front read any body up to 64 MiB, on any path, before it asked the key; it waited for a
connection's first request, and for the rest of a body, without a bound; it took any number of connections. A
keyless client could hold 64 MiB per connection, and 20,000 silent connections filled the process' file
descriptors: new requests and /health timed out while asyncio logged every failed accept with a traceback. With
the cap alone, one keyless client holding all of it with idle connections had everyone else answered 503, /health
too: hence the cap per client address and an idle connection closed for a new one at the cap.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Optional


def _flag(name: str, unit: str, help: str, kind=int, optional: bool = False):
    return dict(flag="--" + name, unit=unit, help=help, kind=kind, optional=optional)


@dataclass(frozen=True)
class HttpLimits:
    """The front's per-connection bounds (each the flag in its metadata)."""

    # At most this many client connections are served at once. One more closes an idle one to take its place (one
    # waiting for its first request's head or between two requests, never one with a request in flight; of the
    # client holding the most connections, its longest idle: http_admission.ConnectionTable), or, none being idle,
    # is answered 503 and closed at once. The front also keeps the process' file descriptors above it
    # (http_admission.connection_cap: each relayed request holds two, the client's and smg's), so accept() never
    # runs out.
    max_connections: int = field(default=1024, metadata=_flag(
        "http-max-connections", "connections", "most client connections the HTTP front serves at once; past it a "
        "new one takes the place of an idle one (the client holding the most first), or is answered 503 and closed "
        "when none is idle"))
    # At most this many of them from one client address (an IPv4 address, an IPv6 /64; loopback counts as any). One
    # more closes that client's own longest idle connection to take its place, or, all of them with a request in
    # flight, is answered 503 and closed (as nginx's limit_conn answers). None: half of the connections served (512
    # by default), which admits a client pool or a benchmark as wide as `vllm bench serve --max-concurrency 512`
    # from one address, while one keyless client holds at most half the front, the rest left to everyone else.
    max_connections_per_client: Optional[int] = field(default=None, metadata=_flag(
        "http-max-connections-per-client", "connections", "most connections the HTTP front serves at once from one "
        "client address (an IPv6 /64 counts as one); past it a new one takes the place of that client's longest "
        "idle one, or is answered 503 and closed when none is idle (default: half of --http-max-connections)",
        optional=True))
    # The whole head of a request must arrive within this many seconds (a connection's first request from its
    # accept, a kept connection's next from its first byte): a silent or trickling connection is closed.
    head_timeout_s: float = field(default=10.0, metadata=_flag(
        "http-head-timeout", "seconds", "seconds a request's head (request line and headers) may take to arrive; "
        "the connection is closed past it", float))
    # The whole body must arrive within this many seconds of its head: 408 past it. 60 s carries the largest
    # default body (64 MiB, relayed) at 1.1 MB/s and a 32 MiB completion at 0.6 MB/s.
    body_timeout_s: float = field(default=60.0, metadata=_flag(
        "http-body-timeout", "seconds", "seconds a request's body may take to arrive after its head (HTTP 408 past it)",
        float))
    # An answer the client does not read (its socket's buffers full) may wait this long for room; then it is
    # abandoned, which ends the request in the engine, and the connection closed.
    stall_timeout_s: float = field(default=30.0, metadata=_flag(
        "http-stall-timeout", "seconds", "seconds an answer may wait for a client that does not read it; then the "
        "request is ended and the connection closed", float))
    # vLLM's routes this process parses (/v1/completions, /v1/chat/completions, /tokenize, /detokenize): a
    # 1M-token prompt of ids is about 7 MB of JSON; a chat may carry a few images inline.
    max_openai_body_bytes: int = field(default=32 << 20, metadata=_flag(
        "max-http-openai-body-bytes", "bytes", "largest body of /v1/completions, /v1/chat/completions, /tokenize and "
        "/detokenize on the HTTP port (HTTP 413 beyond it)"))
    # Every other route relayed to smg with a body (/v1/responses, /v1/messages, /v1/embeddings, ...): smg's cap.
    max_relay_body_bytes: int = field(default=64 << 20, metadata=_flag(
        "max-http-relay-body-bytes", "bytes", "largest body of the other routes the HTTP front relays to the gateway "
        "(HTTP 413 beyond it)"))

    def __post_init__(self) -> None:
        for f in fields(self):
            v, flag = getattr(self, f.name), f.metadata["flag"]
            if v is None and f.metadata["optional"]:
                continue
            if f.metadata["kind"] is int:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{flag}={v!r} is invalid: give the {f.metadata['unit']}, a positive integer.")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{flag}={v!r} is invalid: give the seconds, a positive finite number.")

    @staticmethod
    def flag_of(name: str) -> str:
        """The flag of a field (`max_openai_body_bytes` -> `--max-http-openai-body-bytes`)."""
        return HttpLimits.__dataclass_fields__[name].metadata["flag"]

    def per_client(self, served: int) -> int:
        """The connections one client address may hold when the front serves at most `served` (the cap in effect,
        http_admission.connection_cap): --http-max-connections-per-client, or half of `served`; never above it."""
        wanted = self.max_connections_per_client
        return min(served, wanted if wanted is not None else max(served // 2, 1))


def add_http_limit_args(p: argparse.ArgumentParser) -> None:
    """The HttpLimits flags, each defaulting to the dataclass' value."""
    for f in fields(HttpLimits):
        meta = f.metadata
        p.add_argument(meta["flag"], dest="http_limit_" + f.name, type=meta["kind"], default=f.default,
                       metavar=meta["unit"].upper(),
                       help=meta["help"] if meta["optional"] else f"{meta['help']} (default: %(default)s)")


def http_limits_from(ns: argparse.Namespace) -> HttpLimits:
    """The HttpLimits of parsed flags (a namespace without them: the defaults)."""
    given = {f.name: getattr(ns, "http_limit_" + f.name) for f in fields(HttpLimits)
             if hasattr(ns, "http_limit_" + f.name)}
    return HttpLimits(**given)


__all__ = ["HttpLimits", "add_http_limit_args", "http_limits_from"]
