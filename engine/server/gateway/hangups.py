"""Clients that left before their answer: HTTP hang-ups (through the managed gateway) and Abort calls reach
the requests still being prepared, their grammar compiles among them.

Why: smg (1.13) does not cancel its gRPC call when its HTTP client hangs up before the answer starts (a
request whose grammar still compiles, streamed or not), nor during a non-streamed answer: its HTTP server does
not notice a closed connection while the handler waits, so the call ran to its end (an expensive regex to the
10 s compile limit, one after another, while other users' structured requests got 429; 480 tokens to
max_tokens). Only a stream whose events already flow was aborted (its next write fails). Issue 41, medium 5.

The gateway's front (http_front.py) does see the hang-up. It names each request it relays with a relay id of
its own (RELAY_HEADER, which smg is told to read as the request id: `--request-id-headers`); smg sends the
call with request id `RELAY-<uuid>`. On a hang-up the front calls `Serving.hung_up(relay_id)`: a call under
that relay id still being prepared ends at once with CANCELLED (its compile dropped from the queue, or
killed if it runs), one already generating is aborted, and one that has not reached the server yet is
refused when it does (remembered for GONE_TTL_S). An Abort RPC reaches a request being prepared the same way.

A relay id ends in random characters only the front and its own client know: no client can name another's.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import secrets
import time
from typing import Awaitable, Iterable, Iterator, Optional, TypeVar

from ...contract.safe_text import shown

RELAY_HEADER = "x-moelink-relay-id"
# smg honours a request-id header of 1 to 128 visible ASCII characters; a client's own X-Request-Id (kept as
# the relay id's start, so it still finds its id in the answer) gets this many, the rest is random.
MAX_CLIENT_ID_CHARS = 96
_TOKEN_BYTES = 12  # 16 URL-safe characters: 96 random bits
# smg's gRPC request id: the header's value, "-", a UUID.
_UUID_SUFFIX = re.compile(r"-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# Hang-ups whose call has not arrived yet: remembered this long, at most this many (the oldest forgotten first).
GONE_TTL_S = 120.0
MAX_GONE = 8192

T = TypeVar("T")


class Abandoned(Exception):
    """The request's client left (HTTP hang-up) or an Abort named it before it was admitted: answer CANCELLED."""


def new_relay_id(kind: str, client_id: Optional[str] = None) -> str:
    """A fresh relay id for a request the front relays: `kind` ("chatcmpl", "cmpl", ...) or the client's own
    X-Request-Id (when it is 1 to MAX_CLIENT_ID_CHARS visible ASCII characters), then random characters."""
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    if client_id and len(client_id) <= MAX_CLIENT_ID_CHARS and all("!" <= c <= "~" for c in client_id):
        return f"{client_id}-{token}"
    return f"{kind}-{token}"


def relay_of(request_id: str) -> Optional[str]:
    """The relay id a gRPC request id was made from (`RELAY-<uuid>`), or None for any other id."""
    m = _UUID_SUFFIX.search(request_id)
    return request_id[:m.start()] if m and m.start() > 0 else None


class Watch:
    """One request being prepared: `left` is done once its client left (`Hangups.hung_up` / `abort`)."""

    def __init__(self, request_id: str, relay_id: Optional[str]):
        self.request_id = request_id
        self.relay_id = relay_id
        self.left: asyncio.Future = asyncio.get_running_loop().create_future()

    def leave(self, why: str) -> bool:
        if self.left.done():
            return False
        self.left.set_result(why)
        return True

    def check(self) -> None:
        """Abandoned if the client has left."""
        if self.left.done():
            raise Abandoned(self.left.result())

    async def unless_left(self, work: Awaitable[T]) -> T:
        """`work`'s result, or Abandoned as soon as the client leaves (then `work` is cancelled: a grammar
        compile it waits for is released, and dropped or killed once no one else waits for it)."""
        self.check()
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self.left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # the client left, or this handler was cancelled (a gRPC cancel)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.left.done() and not (task.done() and not task.cancelled() and task.exception() is None):
            raise Abandoned(self.left.result())
        return task.result()


class Hangups:
    """The requests being prepared (by request id and relay id) and the relay ids whose client hung up.
    Event-loop only, like the request registry."""

    def __init__(self, ttl_s: float = GONE_TTL_S, max_gone: int = MAX_GONE):
        self.ttl_s = ttl_s
        self.max_gone = max_gone
        self._gone: collections.OrderedDict[str, float] = collections.OrderedDict()  # relay id -> when
        self._by_id: dict[tuple[str, str], set[Watch]] = {}  # (scope, request id): registry.RequestKey
        self._by_relay: dict[str, set[Watch]] = {}
        self.hangups_total = 0  # hang-ups the front reported
        self.abandoned_total = 0  # requests ended while being prepared (hang-ups and Aborts)

    @contextlib.contextmanager
    def watch(self, request_id: str, scope: str = "") -> Iterator[Watch]:
        """Track `request_id` (of `scope`: registry.RequestKey) while it is prepared. Abandoned at once when its
        relay id already hung up."""
        key = (scope, request_id)
        relay = relay_of(request_id) if not scope else None  # relay ids come from smg, over gRPC (scope "")
        w = Watch(request_id, relay)
        if relay is not None and self._is_gone(relay):
            w.leave(f"request {shown(request_id)} was abandoned: its HTTP client hung up before it arrived")
            self.abandoned_total += 1
            w.check()
        self._by_id.setdefault(key, set()).add(w)
        if relay is not None:
            self._by_relay.setdefault(relay, set()).add(w)
        try:
            yield w
        except Abandoned:
            self.abandoned_total += 1
            raise
        finally:
            _discard(self._by_id, key, w)
            if relay is not None:
                _discard(self._by_relay, relay, w)

    def hung_up(self, relay_id: str) -> int:
        """The front's client for `relay_id` left before its answer ended: every call under it being prepared
        ends now, and one still to come is refused. Returns how many were being prepared."""
        self.hangups_total += 1
        self._remember(relay_id)
        why = "its HTTP client hung up before the answer began"
        return sum(w.leave(f"request {shown(w.request_id)} was abandoned: {why}")
                   for w in list(self._by_relay.get(relay_id, ())))

    def abort(self, request_ids: Iterable[str], scope: str = "") -> int:
        """An Abort named these ids (of `scope`): those being prepared end now. Returns how many."""
        return sum(w.leave(f"request {shown(rid)} was aborted (an Abort call named it) before it was admitted")
                   for rid in request_ids for w in list(self._by_id.get((scope, rid), ())))

    def preparing(self) -> int:
        return sum(len(ws) for ws in self._by_id.values())

    def _remember(self, relay_id: str) -> None:
        self._gone[relay_id] = time.monotonic()
        self._gone.move_to_end(relay_id)
        while len(self._gone) > self.max_gone:
            self._gone.popitem(last=False)

    def _is_gone(self, relay_id: str) -> bool:
        now = time.monotonic()
        while self._gone:  # expire the oldest first
            oldest, t = next(iter(self._gone.items()))
            if now - t <= self.ttl_s:
                break
            del self._gone[oldest]
        return relay_id in self._gone


def _discard(index: dict, key, w: Watch) -> None:
    ws = index.get(key)
    if ws is not None:
        ws.discard(w)
        if not ws:
            del index[key]
