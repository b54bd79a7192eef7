"""How the OpenAI front (http_front.py) admits a connection and reads a request: the connection caps (the front's and
each client address's, an idle connection closed for a new one at the front's: ConnectionTable) and the file
descriptors behind them, a request's head read within its deadline and its size and checked for an ambiguous
framing, and its body read within its deadline and its route's cap (the bounds: http_limits.HttpLimits; issue 95).

The order is the point: the head alone decides whether the body is read at all. The front asks the key and finds
the route from the head (http_front.HttpFront._from_head), then reads at most the route's cap of body; a 401, 404
or 413 is answered with the body left unread, and the connection closed after a short lingering drain.
"""
from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import itertools
import logging
import time
from collections import OrderedDict
from typing import Optional, Union

import h11

from .http_wire import KeptConnection, READ_CHUNK, drained, error_body, header_of, refuse_unread, write_answer

logger = logging.getLogger(__package__ + ".http_front")

# File descriptors left to the rest of the process beside the front's connections (the engine, gRPC, smg's pipes,
# log files, sockets being accepted and refused); each served connection may hold two (the client's, smg's).
FD_RESERVE = 512
# A connection past the cap is answered and then read from for at most this long before it is closed, so that
# the request it already sent is consumed (closing with unread bytes sends a reset, which may destroy the 503).
BUSY_LINGER_S = 0.25
# The listening socket's accept queue: uvicorn's default (vLLM's), not asyncio's 100 (the kernel caps it at
# net.core.somaxconn).
ACCEPT_BACKLOG = 2048
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message (selector_events._accept_connection)


class EveryFew:
    """A log line at most every `every_s` seconds; the ones dropped meanwhile are counted in the next."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.dropped = every_s, float("-inf"), 0

    def __call__(self, log, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.dropped += 1
            return
        if self.dropped:
            message += f" ({self.dropped} more such since the last line)"
        self.last, self.dropped = now, 0
        log(message, *args)


_busy_log, _client_log, _accept_log, _evict_log = EveryFew(), EveryFew(), EveryFew(), EveryFew()


def raise_fd_limit() -> int:
    """The process' soft limit on open files, first raised to its hard limit (what a process may do unprivileged:
    the soft one is often 1024, below the connections a front serves); 0 when it cannot be known."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return 0 if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int) -> int:
    """The connections the front serves at once: `wanted` (--http-max-connections), lowered (and said) where the
    file descriptors would not hold that many beside FD_RESERVE, so accept() does not run out before the cap."""
    soft = raise_fd_limit()
    if not soft:
        return wanted
    room = max((soft - FD_RESERVE) // 2, 16)
    if wanted <= room:
        return wanted
    logger.warning("--http-max-connections %d: this process may open %d files (ulimit -n), room for %d HTTP "
                   "connections beside the rest: serving at most %d", wanted, soft, room, room)
    return room


def quiet_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every accept() that fails for want of file descriptors, and (Python 3.11) tries
    up to its backlog again at once: a full process wrote tens of MB of log a minute. Such a failure is said at most
    every 10 s here, in one line; any other error goes to the loop's handler as before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_accept_failures", False):
        return

    def handler(loop, context) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_FAILED and isinstance(exc, OSError):
            _accept_log(logger.warning, "the HTTP front could not accept a connection (%s): out of file descriptors "
                        "or memory; lower --http-max-connections or raise `ulimit -n`", errno.errorcode.get(
                            exc.errno, exc.errno))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_accept_failures = True  # type: ignore[attr-defined]  # marks it so a second front does not wrap it
    loop.set_exception_handler(handler)


def raw_answer(status: int, body: bytes) -> bytes:
    """A whole answer with `connection: close`, outside h11 (a connection refused before or instead of its request,
    or whose request h11 could not read)."""
    from http import HTTPStatus

    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def client_address(peername) -> str:
    """What a connection is counted under for --http-max-connections-per-client: its peer's IPv4 address (an
    IPv4-mapped IPv6 one read as IPv4), the /64 of an IPv6 one (what one site or host is given: a client may send
    from any of its 2^64 addresses), or '' (no address: a Unix socket)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return ""
    host = peername[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # a link-local one may carry its zone
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Slot:
    """One admitted connection in a ConnectionTable: its client address, its writer (closed when it is evicted)."""

    __slots__ = ("client", "writer", "gone")

    def __init__(self, client: str, writer: asyncio.StreamWriter):
        self.client, self.writer, self.gone = client, writer, False


PER_CLIENT, ALL = "per-client", "all"  # ConnectionTable.admit's refusals


class ConnectionTable:
    """The connections the front serves: at most `most` at once, at most `per_client` from one client address
    (client_address). A new connection past either takes the place of an idle one, one waiting for a request's head
    (its first, or the next on a kept connection), never one with a request in flight, closed at once: past its
    client's cap, that client's own one idle longest; at `most`, the one idle longest of the client holding the
    most connections. Only when none is idle is the new one refused. Why (issue 95): one keyless client holding
    every slot with idle connections had everyone else, /health included, answered 503 for up to a head timeout at
    a time; and a client on the same address as such a one (a probe on the same host) is served the same way.

    Each step is O(log n): a count per client, each client's idle connections in the order they became idle, and a
    heap of (-connections, client) over the clients with an idle one, its stale entries skipped (and the heap
    rebuilt when they outnumber the live ones)."""

    def __init__(self, most: int, per_client: int):
        self.most, self.per_client = most, per_client
        self.count = 0
        self._held: dict[str, int] = {}  # client -> its connections
        self._idle: dict[str, OrderedDict[Slot, None]] = {}  # client -> its idle ones, the longest idle first
        self._heap: list[tuple[int, int, str]] = []  # (-connections, order, client): clients with an idle one
        self._order = itertools.count()
        self.evicted = 0

    def admit(self, client: str, writer: asyncio.StreamWriter) -> Union[Slot, str]:
        """A Slot for a new connection (an idle one closed first past a cap), or why it is refused: PER_CLIENT (its
        client holds `per_client`, none idle) or ALL (`most` are open, none idle)."""
        if self._held.get(client, 0) >= self.per_client:
            idle = self._idle.get(client)
            if not idle:
                return PER_CLIENT
            self._evict(next(iter(idle)), "--http-max-connections-per-client")
        if self.count >= self.most and not self._evict_most():
            return ALL
        self.count += 1
        self._held[client] = self._held.get(client, 0) + 1
        self._push(client)
        return Slot(client, writer)

    def idle(self, slot: Slot) -> None:
        """`slot` waits for a request's head: it may be evicted."""
        if slot.gone:
            return
        idle = self._idle.setdefault(slot.client, OrderedDict())
        idle[slot] = None
        if len(idle) == 1:
            self._push(slot.client)

    def busy(self, slot: Slot) -> bool:
        """`slot` has a request in flight: it is not evicted until idle again. False: it was evicted already (a
        request read in the same turn of the loop as its eviction): the connection is closed, the request dropped."""
        if slot.gone:
            return False
        self._not_idle(slot)
        return True

    def release(self, slot: Slot) -> None:
        """`slot`'s connection ended (its own end, or evicted)."""
        if slot.gone:
            return
        self._not_idle(slot)
        slot.gone = True
        self.count -= 1
        left = self._held[slot.client] - 1
        if left:
            self._held[slot.client] = left
        else:
            del self._held[slot.client]
        self._push(slot.client)

    def _not_idle(self, slot: Slot) -> None:
        idle = self._idle.get(slot.client)
        if idle is not None:
            idle.pop(slot, None)
            if not idle:
                del self._idle[slot.client]

    def _push(self, client: str) -> None:
        """A heap entry for `client`'s connections now, if it has an idle one (older entries go stale)."""
        if client not in self._idle:
            return
        heapq.heappush(self._heap, (-self._held[client], next(self._order), client))
        if len(self._heap) > 2 * len(self._idle) + 64:
            self._heap = [(-self._held[c], next(self._order), c) for c in self._idle]
            heapq.heapify(self._heap)

    def _evict_most(self) -> bool:
        """Close the longest idle connection of the client holding the most with one idle; False if none is."""
        while self._heap:
            held, _, client = self._heap[0]
            idle = self._idle.get(client)
            if idle is None or self._held.get(client) != -held:
                heapq.heappop(self._heap)  # stale: that client's count changed, or it has none idle now
                continue
            self._evict(next(iter(idle)), "--http-max-connections")
            return True
        return False

    def _evict(self, slot: Slot, flag: str) -> None:
        held = self._held[slot.client]
        self.release(slot)
        slot.writer.close()  # its read_head reads EOF and its handler ends
        self.evicted += 1
        _evict_log(logger.warning, "the HTTP front closes idle connections for new ones (%s): %s held %d",
                   flag, slot.client or "a local socket", held)


async def refuse_busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cap: int,
                      client: Optional[str] = None) -> None:
    """A connection past a cap with none idle to close for it (`client`: its address, past
    --http-max-connections-per-client; None: past --http-max-connections): 503 in vLLM's shape, naming the flag,
    then closed (after at most BUSY_LINGER_S of reading). 503, as nginx's limit_conn answers."""
    if client is None:
        _busy_log(logger.warning, "the HTTP front serves %d connections (--http-max-connections), none idle: new "
                  "ones are answered 503 and closed", cap)
        message = (f"the server has {cap} connections open, its most (--http-max-connections), each with a request "
                   "in flight; retry shortly.")
    else:
        _client_log(logger.warning, "%s holds %d connections to the HTTP front (--http-max-connections-per-client), "
                    "none idle: its new ones are answered 503 and closed", client or "a local socket", cap)
        message = (f"this client has {cap} connections open, the most one client may hold "
                   "(--http-max-connections-per-client), each with a request in flight; retry shortly.")
    writer.write(raw_answer(503, error_body(message, None, 503)))
    try:
        writer.write_eof()
        await asyncio.wait_for(_drop_until_eof(reader), BUSY_LINGER_S)
    except (Exception, asyncio.TimeoutError):
        pass


async def _drop_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_CHUNK):
        pass


async def read_head(conn: h11.Connection, reader: asyncio.StreamReader, idle_s: Optional[float],
                    head_s: float, most: int) -> Optional[tuple[h11.Request, bytes]]:
    """The next request's head (the event, and its bytes as sent), or None when the client left, sent nothing for
    `idle_s` (a kept connection between requests; None: the first request, under `head_s` from now), or did not
    finish the head within `head_s` of its first byte: one deadline for the whole head, however it trickles in.
    h11.RemoteProtocolError: a malformed head, or (error_status_hint 431) one over `most` bytes, its blank line
    included. h11 refuses only a head still incomplete past its max_incomplete_event_size (`most`): one that
    completed within the read that passed it was taken, up to twice `most`; counted here, the bound is exact."""
    loop = asyncio.get_running_loop()
    seen = bytearray(conn.trailing_data[0])  # a next request already received (pipelined)
    deadline = None if idle_s is not None and not seen else loop.time() + head_s
    while True:
        try:
            event = conn.next_event()  # h11.RemoteProtocolError: malformed, or the client closed halfway through
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # h11's "Receive buffer too long": said as below
                raise _head_too_large(most) from None
            raise
        if isinstance(event, h11.Request):
            raw = bytes(seen[:len(seen) - len(conn.trailing_data[0])])
            if len(raw) > most:
                raise _head_too_large(most)
            return event, raw
        if event is not h11.NEED_DATA:  # ConnectionClosed
            return None
        wait = idle_s if deadline is None else deadline - loop.time()
        if wait <= 0:
            return None
        try:
            data = await asyncio.wait_for(reader.read(READ_CHUNK), wait)
        except asyncio.TimeoutError:
            return None
        if deadline is None:
            deadline = loop.time() + head_s
        seen += data
        conn.receive_data(data)


def _head_too_large(most: int) -> h11.RemoteProtocolError:
    return h11.RemoteProtocolError(f"the request head is over {most} bytes.", error_status_hint=431)


def framing_refusal(raw_head: bytes) -> Optional[str]:
    """Why a head's framing is ambiguous (two Content-Lengths, even equal ones, which h11 merges; Content-Length
    beside Transfer-Encoding, which h11 reads as chunked), or None. A proxy before the front may frame it the other
    way (request smuggling): refused with 400, as RFC 9112 6.3 asks."""
    lengths, chunked = 0, False
    for line in raw_head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if colon and name == b"content-length":
            lengths += len(value.split(b","))
        elif colon and name == b"transfer-encoding":
            chunked = True
    if lengths > 1:
        return "the request has more than one Content-Length."
    if lengths and chunked:
        return "the request has both Content-Length and Transfer-Encoding."
    return None


def declares_body(request: h11.Request) -> bool:
    """Whether a request's head announces a body (a Content-Length above 0, or chunked)."""
    length = header_of(request, b"content-length")
    return header_of(request, b"transfer-encoding") is not None or (length is not None and int(length) > 0)


async def read_body(conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: h11.Request, most: int, flag: str, body_s: float) -> Optional[bytes]:
    """The body of `request` (its head read), or None when it is over `most` bytes (answered 413 naming `flag`,
    from its Content-Length before a byte is read, or as a chunked one passes it) or did not arrive within `body_s`
    (answered 408): both leave the rest unread and the connection closing."""
    head = request.method == b"HEAD"
    length = header_of(request, b"content-length")
    if length is not None and int(length) > most:  # h11 took digits only
        await refuse_unread(conn, reader, writer, 413, _too_large(most, flag), head)
        return None
    loop = asyncio.get_running_loop()
    deadline, body = loop.time() + body_s, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                if isinstance(conn, KeptConnection):
                    conn.closing = True
                await write_answer(conn, writer, 408, error_body(
                    f"the request body did not arrive within {body_s:g} s (--http-body-timeout).", None, 408),
                    head_only=head)
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > most:
                await refuse_unread(conn, reader, writer, 413, _too_large(most, flag), head)
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:  # ConnectionClosed
            return None


def _too_large(most: int, flag: str) -> bytes:
    return error_body(f"the request body is over {most} bytes ({flag}).", None, 413)


async def answer_bad_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str,
                          stall_s: float, status: int = 400) -> None:
    """A request h11 could not read, or whose framing is ambiguous: `status` (400; 431 for a head too large) in
    vLLM's shape, the connection closed after a lingering drain (the rest of what it sent is never read as a
    request), as uvicorn answers what h11 refuses."""
    from .http_wire import LINGER_S

    writer.write(raw_answer(status, error_body(f"invalid HTTP request: {why}", None, status)))
    await drained(writer, stall_s)
    try:
        await asyncio.wait_for(_drop_until_eof(reader), LINGER_S)
    except (Exception, asyncio.TimeoutError):
        pass


__all__ = ["ACCEPT_BACKLOG", "ALL", "BUSY_LINGER_S", "FD_RESERVE", "PER_CLIENT", "ConnectionTable", "Slot",
           "answer_bad_head", "client_address", "connection_cap", "declares_body", "framing_refusal",
           "quiet_accept_failures", "raise_fd_limit", "raw_answer", "read_body", "read_head", "refuse_busy"]
