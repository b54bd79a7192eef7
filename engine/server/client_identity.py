"""Who sent a request: the client path the scheduler shares sequence slots and tokens by (scheduler/fairness.py).

What a client is, widest name first; the scheduler shares per level of these paths (hosts as equals, then each
host's part among its connections or named users), so spreading load over more names gains a host nothing:
- ("host:H", "user:NAME") when the server requires an API key (`--api-key`: the caller proved it holds it) and the
  call carries `x-client-id: NAME` metadata: a trusted front (a gateway, a company proxy) names the end user it
  serves, so its users share its host's part fairly among themselves. The name is nested under the caller's own
  address: a fresh name per request only splits that host's part, and claiming another host's user's name does not
  join that user's client (issue 95: either let one key holder take every slot from another host). Without an API
  key the header is ignored: any caller could claim a thousand names.
- otherwise the gRPC peer: ("host:H", "conn:P"), its host then its connection (TCP port). Opening more connections
  does not win a host more than its part; two programs on one machine (loopback) are still two clients. A
  Unix-socket or unparsed peer is ("peer:...",), and a name it gives ("peer:...", "user:NAME").
The n samples of a request are sequences of the same client. The OpenAI `user` field reaches a gRPC server only if
the gateway forwards it as `x-client-id`; the vLLM protocol has no field for it.

The routes the HTTP front answers from the engine (SGLang's /generate) name their client the same way
(`http_client`): the `x-client-id` header under `--api-key`, else the TCP peer, ("host:H", "conn:P") with an IPv6
host in brackets as gRPC writes it, so one machine's gRPC and HTTP requests share its host's part. Without it every
/generate user was one client: one user's 20,000-prompt batch kept another waiting 261 s (issue 76 item 10).

The scope of an HTTP request's ids (`client_scope`, registry.RequestKey: whose `rid`s an /abort_request may end) is
the user's name when one is given, so a user reaches its own requests through any replica of its gateway, else
the host (its connections are one caller's).
"""
from __future__ import annotations

from collections.abc import Iterable

CLIENT_ID_HEADER = "x-client-id"
# Longer names are cut: a name is a dictionary key per step, not something to store megabytes of.
MAX_CLIENT_ID_CHARS = 128


def peer_client(peer: str | None) -> tuple[str, ...]:
    """("host:H", "conn:P") for 'ipv4:H:P' / 'ipv6:[H]:P' (grpc's `context.peer()`), else ("peer:...",)."""
    peer = peer or ""
    scheme, _, addr = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host, sep, port = addr.rpartition(":")
        if sep and host and port.isdigit():
            return (f"host:{host}", f"conn:{port}")
    return (f"peer:{peer[:MAX_CLIENT_ID_CHARS]}",)


def claimed_client(metadata: Iterable[tuple[str, object]] | None) -> str | None:
    """The `x-client-id` metadata value (stripped, cut to MAX_CLIENT_ID_CHARS), or None when absent or empty."""
    for key, value in metadata or ():
        if key == CLIENT_ID_HEADER and isinstance(value, str):
            value = value.strip()[:MAX_CLIENT_ID_CHARS]
            return value or None
    return None


def client_of(context, authenticated: bool) -> tuple[str, ...]:
    """The client path of the call `context` (a grpc.aio.ServicerContext). `authenticated`: the server requires an
    API key, so this caller holds it and may name the user it serves."""
    peer = peer_client(context.peer())
    if authenticated:
        name = claimed_client(context.invocation_metadata())
        if name is not None:
            return (peer[0], f"user:{name}")  # under its caller's host (module docstring)
    return peer


def http_client(peer, claimed: str | None, authenticated: bool) -> tuple[str, ...]:
    """The client path of an HTTP request: `peer` is the socket's peer address (asyncio's "peername": (host, port)
    or (host, port, flow, scope)), `claimed` its `x-client-id` header, trusted only when `authenticated` (the front
    requires an API key and the request carried it)."""
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        host = str(peer[0])
        client: tuple[str, ...] = (f"host:[{host}]" if ":" in host else f"host:{host}", f"conn:{peer[1]}")
    else:
        client = (f"peer:{str(peer or '')[:MAX_CLIENT_ID_CHARS]}",)
    if authenticated:
        name = claimed_client([(CLIENT_ID_HEADER, claimed)])
        if name is not None:
            return (client[0], f"user:{name}")  # under its caller's host (module docstring)
    return client


def client_scope(client: tuple[str, ...]) -> str:
    """The scope of a client's request ids (module docstring): its "user:NAME" when named, else its widest name
    (the host); "" for no client."""
    if not client:
        return ""
    return client[-1] if client[-1].startswith("user:") else client[0]
