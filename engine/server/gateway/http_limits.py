"""What the OpenAI HTTP front (http_front.py) grants one client connection: how many may be open, how long a
request's head and body may take to arrive, how long an answer may wait on a client that does not read it, and how
large a body each route reads. Each is a flag of `moelink serve` and of `moelink http-front`.

Why (issue 95): the front read any body up to 64 MiB, on any path, before it asked the key; it waited for a
connection's first request, and for the rest of a body, without a bound; it took any number of connections. A
keyless client could hold 64 MiB per connection, and 20,000 silent connections filled the process' file
descriptors: new requests and /health timed out while asyncio logged every failed accept with a traceback.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields


def _flag(name: str, unit: str, help: str, kind=int):
    return dict(flag="--" + name, unit=unit, help=help, kind=kind)


@dataclass(frozen=True)
class HttpLimits:
    """The front's per-connection bounds (each the flag in its metadata)."""

    # At most this many client connections are served at once; one more is answered 503 and closed at once. The
    # front also keeps the process' file descriptors above it (http_admission.connection_cap: each relayed request
    # holds two, the client's and smg's), so accept() never runs out.
    max_connections: int = field(default=1024, metadata=_flag(
        "http-max-connections", "connections", "most client connections the HTTP front serves at once; one more is "
        "answered 503 and closed"))
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
            if f.metadata["kind"] is int:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{flag}={v!r} is invalid: give the {f.metadata['unit']}, a positive integer.")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{flag}={v!r} is invalid: give the seconds, a positive finite number.")

    @staticmethod
    def flag_of(name: str) -> str:
        """The flag of a field (`max_openai_body_bytes` -> `--max-http-openai-body-bytes`)."""
        return HttpLimits.__dataclass_fields__[name].metadata["flag"]


def add_http_limit_args(p: argparse.ArgumentParser) -> None:
    """The HttpLimits flags, each defaulting to the dataclass' value."""
    for f in fields(HttpLimits):
        meta = f.metadata
        p.add_argument(meta["flag"], dest="http_limit_" + f.name, type=meta["kind"], default=f.default,
                       metavar=meta["unit"].upper(), help=f"{meta['help']} (default: %(default)s)")


def http_limits_from(ns: argparse.Namespace) -> HttpLimits:
    """The HttpLimits of parsed flags (a namespace without them: the defaults)."""
    given = {f.name: getattr(ns, "http_limit_" + f.name) for f in fields(HttpLimits)
             if hasattr(ns, "http_limit_" + f.name)}
    return HttpLimits(**given)


__all__ = ["HttpLimits", "add_http_limit_args", "http_limits_from"]
