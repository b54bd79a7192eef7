"""HTTP/1.1 plumbing of the OpenAI front (http_front.py): the answers it writes itself, the error body in vLLM's shape,
response heads read and rewritten, bytes copied between the client and smg."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
from http import HTTPStatus
from typing import Optional

import h11

READ_CHUNK = 64 << 10
# How long a kept connection (HTTP/1.1 keep-alive) waits for its next request before the front closes it: vLLM's
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE (its uvicorn's timeout_keep_alive), read the same way (keep_alive_s).
KEEP_ALIVE_S = 5.0
KEEP_ALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"
# The most bytes of a next request a client may send on a kept connection while its answer is being written (HTTP
# pipelining): past it the hang-up watch stops reading, and the rest waits in the socket for the next cycle.
MAX_PIPELINED_BYTES = 64 << 10


class KeptConnection(h11.Connection):
    """The server side of one client connection that may carry several requests in turn (HTTP/1.1 keep-alive, as
    vLLM's uvicorn and smg serve them). Why: a client's connection pool (the OpenAI SDK's httpx, `vllm bench serve`'s
    aiohttp) sends each request on a connection it already has; closing after every answer made each request pay a
    TCP connect and the front an accept, on the token's path. An answer says `connection: close` only when the
    connection ends after it (`closing`: a body refused unread, the front stopping) or the client asked so (h11
    adds the header then). A plain h11.Connection is answered as before: one request, `connection: close`."""

    def __init__(self, max_incomplete_event_size: int, stall_s: Optional[float] = None):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.closing = False
        self.stall_s = stall_s  # how long an answer waits for a client that does not read it (drained)


def keep_alive_s() -> float:
    """The idle wait of a kept connection: VLLM_HTTP_TIMEOUT_KEEP_ALIVE seconds when set (as vLLM reads it), else
    KEEP_ALIVE_S; anything but a positive number refused naming the variable."""
    given = os.environ.get(KEEP_ALIVE_ENV)
    if given is None or not given.strip():
        return KEEP_ALIVE_S
    try:
        value = float(given)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{KEEP_ALIVE_ENV}={given!r}: give the seconds an idle HTTP connection is kept, a positive "
                         f"number (vLLM's default: 5).")
    return value


def _closes(conn: h11.Connection) -> list[tuple[bytes, bytes]]:
    """The `connection: close` header of an answer after which `conn` ends, else none (KeptConnection)."""
    return [] if isinstance(conn, KeptConnection) and not conn.closing else [(b"connection", b"close")]


class Upstream:
    """One relayed request's connection to smg (replaced when the request is sent again) and the bytes sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.request = b""


def status_of(head: bytes) -> int:
    """The status code of a response head (`HTTP/1.1 503 Service Unavailable...`); 0 if it has none."""
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def header_of(request: h11.Request, name: bytes) -> Optional[str]:
    """A request header's value (h11 lowercases names), or None."""
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def copy_stream(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(READ_CHUNK):
        dst.write(data)
        await dst.drain()


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Returns when the client closes; bytes it sends meanwhile (a pipelined request) are dropped: this
    connection closes after one answer, which says so."""
    while await reader.read(READ_CHUNK):
        pass


async def until_hangup(conn: h11.Connection, reader: asyncio.StreamReader) -> None:
    """Returns when the client closes its end while its answer is written. On a KeptConnection the bytes it sends
    meanwhile (its next request, pipelined) are kept in h11's buffer for the next cycle; past MAX_PIPELINED_BYTES
    the watch stops reading (the rest stays in the socket) and only the answer's end ends it. On a plain one they
    are dropped (until_eof): that connection closes after the answer."""
    if not isinstance(conn, KeptConnection):
        await until_eof(reader)
        return
    held = 0
    while data := await reader.read(READ_CHUNK):
        conn.receive_data(data)
        held += len(data)
        if held > MAX_PIPELINED_BYTES:
            await asyncio.Event().wait()  # cancelled when the answer ends (answer_watched)


def closing_head(head: bytes) -> bytes:
    """A response head with its Connection header replaced by `connection: close`."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() != b"connection"]
    return b"\r\n".join(kept + [b"connection: close"]) + b"\r\n\r\n"


# vLLM 0.32's error `type` per status (vllm/entrypoints/serve/exception_handling/error_response.py: its own errors);
# any other status is named by its HTTP phrase, as vLLM's HTTPException handler names it ("Method Not Allowed").
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError",
               500: "InternalServerError", 501: "NotImplementedError", 503: "ServiceUnavailableError"}


def error_type(status: int) -> str:
    """vLLM's error `type` for an HTTP status."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError"


def error_object(message: str, param: Optional[str], status: int = 400) -> dict:
    """vLLM's error body as a dict: {"error": {"message", "type", "param", "code": the HTTP status}}."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}


def error_body(message: str, param: Optional[str], status: int = 400) -> bytes:
    """vLLM's error body (ErrorResponse: `param` the request field at fault, `code` the HTTP status as an int)."""
    return json.dumps(error_object(message, param, status)).encode()


# What vLLM's FastAPI app answers for a path it has no route for, and for a route asked with another method (the
# framework's own bodies, not an ErrorResponse), and its API-key middleware's 401.
NOT_FOUND_BODY = b'{"detail":"Not Found"}'
METHOD_NOT_ALLOWED_BODY = b'{"detail":"Method Not Allowed"}'
UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'


# After a 413 sent before the body was read, the rest of it is read and dropped for at most this long, so the
# client, still sending, reads the answer instead of a reset connection (nginx's lingering close).
LINGER_S = 1.0


async def refuse_unread(conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        status: int, body: bytes, head: bool = False, extra: tuple = ()) -> None:
    """Answer a request whose body is left unread (a 413 from its Content-Length, a 401 or 404 from its head), then
    drop what the client still sends for at most LINGER_S: the connection cannot carry another request."""
    if isinstance(conn, KeptConnection):
        conn.closing = True
    await write_answer(conn, writer, status, body, extra=extra, head_only=head)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(until_eof(reader), LINGER_S)


class ClientStalled(ConnectionError):
    """The client read nothing of its answer for the connection's stall bound (--http-stall-timeout)."""


def stall_of(conn) -> Optional[float]:
    """How long an answer on `conn` may wait for the client to read (KeptConnection.stall_s), or None: unbounded."""
    return getattr(conn, "stall_s", None)


class BoundedWriter:
    """A client's writer whose drain() waits at most `stall_s` (drained): what the relay copies smg's answer
    through (relay.py, model_name.py), so that a client that reads nothing of it does not hold it for ever."""

    def __init__(self, writer: asyncio.StreamWriter, stall_s: float):
        self.writer, self.stall_s = writer, stall_s

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await drained(self.writer, self.stall_s)

    def __getattr__(self, name: str):
        return getattr(self.writer, name)


async def drained(writer: asyncio.StreamWriter, stall_s: Optional[float]) -> None:
    """writer.drain(), which waits while the transport's buffer is over its high-water mark (the client not
    reading), for at most `stall_s`: ClientStalled past it. The buffer is what bounds the front's memory for an
    answer; the wait is what bounds how long a client that reads nothing holds the request in the engine."""
    if stall_s is None:
        await writer.drain()
        return
    try:
        await asyncio.wait_for(writer.drain(), stall_s)
    except asyncio.TimeoutError:
        raise ClientStalled(f"the client read nothing of its answer for {stall_s:g} s") from None


async def write_answer(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes,
                       content_type: Optional[bytes] = b"application/json", extra: tuple = (),
                       head_only: bool = False) -> None:
    """The whole answer; `head_only` for a HEAD request: the headers it would have, no body (h11 refuses one, and a
    HEAD answered with a body dropped the connection with a traceback: issue 76 item 12). `content_type` None: no
    such header (an empty answer, as vLLM's /health)."""
    headers = ([(b"content-type", content_type)] if content_type is not None else []) + [
        (b"content-length", str(len(body)).encode()), *_closes(conn), *extra]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=body))
    writer.write(data + conn.send(h11.EndOfMessage()))
    await drained(writer, stall_of(conn))


async def answer_watched(conn: h11.Connection, writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                         answering, head_only: bool = False) -> None:
    """Write the answer the coroutine `answering` gives, (status, body) or a generate_route.Streamed (its chunks
    sent as they come, chunked), while the client is watched: one that closes its end first cancels the answer,
    which ends the request in the engine (its stream is closed). `head_only`: a HEAD request's (write_answer)."""
    gone = asyncio.ensure_future(until_hangup(conn, reader))
    work = asyncio.ensure_future(_write_answer(conn, writer, answering, head_only))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, gone):
            t.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    failure = work.exception() if work.done() and not work.cancelled() else None
    if failure is not None:
        # The answer failed (a stalled client, a write error, a bug making it): the caller's to say and handle.
        # Gathered and dropped, it left a connection closed with nothing logged (issue 95 item 5).
        raise failure


async def _write_answer(conn: h11.Connection, writer: asyncio.StreamWriter, answering, head_only: bool) -> None:
    got = await answering
    if isinstance(got, tuple):
        status, body = got  # (HTTP status, JSON body)
        await write_answer(conn, writer, status, body, head_only=head_only)
        return
    try:
        await _write_stream(conn, writer, got)
    finally:  # also when cancelled (the client left) before a chunk was asked for
        await got.chunks.aclose()
        await got.stop()


async def _write_stream(conn: h11.Connection, writer: asyncio.StreamWriter, got) -> None:
    # Streamed: no content-length, so h11 frames the body with chunked transfer coding. The head goes out with the
    # first chunk, in one write (one packet, one wake-up of the client: its first token sooner); the routes hand a
    # Streamed over once the first output is in hand, so that chunk follows at once.
    head = h11.Response(status_code=200, headers=[(b"content-type", got.content_type), (b"cache-control", b"no-cache"),
                                                  *_closes(conn)])
    pending = conn.send(head)
    async for chunk in got.chunks:
        writer.write(pending + conn.send(h11.Data(data=chunk)))
        pending = b""
        # The next chunk is asked for only once this one is taken (or the stall bound passes): the generator is
        # pulled, never pushed, so a client that does not read holds at most the transport's buffer here.
        await drained(writer, stall_of(conn))
    writer.write(pending + conn.send(h11.EndOfMessage()))
    await drained(writer, stall_of(conn))


def moelink_version() -> str:
    """moelink's version (what GET /version answers, as vLLM's answers vLLM's)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("moelink")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
