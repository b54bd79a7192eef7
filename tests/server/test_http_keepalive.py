"""The OpenAI front keeps a client's connection for its next request (HTTP/1.1 keep-alive, as vLLM's uvicorn does):
http_wire.KeptConnection. A client's pool (the OpenAI SDK, `vllm bench serve`) sends each request on a connection it
has; closing after every answer made each one pay a TCP connect on the token's path (issue 78).

A front without an engine, before a stand-in smg, with a stand-in completions route that streams: no model runs.
"""
from __future__ import annotations

import asyncio
import socket

import pytest

from moelink.engine.server.gateway import http_wire
from moelink.engine.server.gateway.generate_route import Streamed
from moelink.engine.server.gateway.http_front import HttpFront

from tests.helpers.net import free_port

KEY = "k3y"
AUTH = b"authorization: Bearer " + KEY.encode() + b"\r\n"


class _Local:
    """The engine's routes beside the front: none answered here (each relayed), as a front before smg."""

    base_name = "m"

    async def answer(self, method, path, body, query, client=()):
        return None


class _Completions:
    """A completions route that streams three chunks for any body and counts the streams it was asked to stop."""

    def __init__(self):
        self.stopped = 0

    async def claim(self, body, client=(), header_id=None):
        async def chunks():
            for i in range(3):
                yield b"data: %d\n\n" % i

        async def stop():
            self.stopped += 1

        async def answering():
            return Streamed(chunks(), stop)
        return answering()


async def _upstream(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
    await writer.drain()
    writer.close()


def _scenario(client):
    """Runs a front (its accepted connections counted) and `client(port)` on a thread; (its result, connections,
    the completions route)."""
    route = _Completions()

    async def run():
        up = await asyncio.start_server(_upstream, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], KEY, local=_Local(),
                          completions=route)
        accepted = []
        serve = front._serve

        async def counted(reader, writer):
            accepted.append(writer.get_extra_info("peername"))
            await serve(reader, writer)
        front._serve = counted
        await front.start()
        try:
            return await asyncio.to_thread(client, front.port), accepted
        finally:
            await front.stop()
            up.close()

    got, accepted = asyncio.run(run())
    return got, accepted, route


def _read_answer(sock: socket.socket, buf: bytearray) -> bytes:
    """One whole answer from `sock` (content-length or chunked), the bytes after it left in `buf`."""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        assert more, "the connection closed before an answer"
        buf += more
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while b"\r\n0\r\n\r\n" not in rest:
            more = sock.recv(65536)
            assert more, "the connection closed inside a chunked answer"
            rest += more
        body, _, after = rest.partition(b"\r\n0\r\n\r\n")
        body += b"\r\n0\r\n\r\n"
    else:
        length = int(lower.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            more = sock.recv(65536)
            assert more, "the connection closed inside an answer"
            rest += more
        body, after = rest[:length], rest[length:]
    buf[:] = after
    return head + b"\r\n\r\n" + body


def _request(path: bytes, method: bytes = b"GET", body: bytes = b"", extra: bytes = b"") -> bytes:
    return (method + b" " + path + b" HTTP/1.1\r\nhost: x\r\n" + AUTH + extra
            + b"content-length: %d\r\n\r\n" % len(body) + body)


def test_requests_answered_here_share_one_connection_streams_included():
    """/version, a stream and /version again on one connection: each answered, none saying `connection: close`,
    one connection accepted; the stream's head and first chunk leave in one write (they arrive together)."""
    def client(port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        buf = bytearray()
        answers = []
        for req in (_request(b"/version"), _request(b"/v1/completions", b"POST", b'{"prompt": "x"}'),
                    _request(b"/version")):
            sock.sendall(req)
            answers.append(_read_answer(sock, buf))
        sock.close()
        return answers

    answers, accepted, route = _scenario(client)
    assert len(accepted) == 1
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower(), answer
    assert b"data: 0" in answers[1] and b"data: 2" in answers[1] and route.stopped == 1


def test_a_pipelined_request_is_answered_after_the_stream_before_it():
    """A client that sends its next request before the stream's answer ended (HTTP pipelining): the bytes the
    hang-up watch read meanwhile are kept, and the second answer follows the first, in order."""
    def client(port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(_request(b"/v1/completions", b"POST", b"{}") + _request(b"/version"))
        buf = bytearray()
        first, second = _read_answer(sock, buf), _read_answer(sock, buf)
        sock.close()
        return first, second

    (first, second), accepted, _ = _scenario(client)
    assert b"data: 2" in first and second.startswith(b"HTTP/1.1 200") and b'"version"' in second
    assert len(accepted) == 1


def test_the_connection_closes_when_the_client_asks_when_idle_and_after_a_relayed_answer(monkeypatch):
    """`connection: close` from the client, an idle kept connection after VLLM_HTTP_TIMEOUT_KEEP_ALIVE, and a relayed
    answer (smg's bytes copied, which say `connection: close`) each end the connection: the client reads EOF."""
    def client(port):
        out = {}
        for name, req in (("asked", _request(b"/version", extra=b"connection: close\r\n")),
                          ("relayed", _request(b"/v1/models")), ("idle", _request(b"/version"))):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(req)
            buf = bytearray()
            answer = _read_answer(sock, buf)
            out[name] = (answer, sock.recv(65536))  # b"": the front closed its end
            sock.close()
        return out

    monkeypatch.setenv(http_wire.KEEP_ALIVE_ENV, "0.2")  # vLLM's variable, read as vLLM reads it
    out, _, _ = _scenario(client)
    for name in ("asked", "relayed", "idle"):
        answer, after = out[name]
        assert answer.startswith(b"HTTP/1.1 200") and after == b"", (name, answer, after)
    assert b"connection: close" in out["asked"][0].lower() and b"connection: close" in out["relayed"][0].lower()


def test_a_body_refused_unread_closes_the_connection_and_says_so():
    """A body over the front's cap is refused from its head (413) without being read: that connection cannot carry
    another request, and its answer says `connection: close`."""
    def client(port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"content-length: %d\r\n\r\n"
                     % ((64 << 20) + 1))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        return data

    data, _, _ = _scenario(client)
    assert data.startswith(b"HTTP/1.1 413") and b"connection: close" in data.lower(), data[:300]


@pytest.mark.parametrize("held", [0, http_wire.MAX_PIPELINED_BYTES + 1])
def test_until_hangup_keeps_pipelined_bytes_for_the_next_cycle(held):
    """The hang-up watch on a kept connection hands what it reads to h11 (up to MAX_PIPELINED_BYTES, then stops
    reading) and returns at the client's EOF; on a plain h11 connection it drops them (that one closes)."""
    async def run():
        reader = asyncio.StreamReader()
        conn = http_wire.KeptConnection(max_incomplete_event_size=1 << 16)
        reader.feed_data(b"x" * max(held, 5))
        if not held:
            reader.feed_eof()
        watch = asyncio.ensure_future(http_wire.until_hangup(conn, reader))
        await asyncio.sleep(0.05)
        done = watch.done()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        return done, len(conn.trailing_data[0])

    done, kept = asyncio.run(run())
    assert kept == max(held, 5)
    assert done is (not held)  # EOF ends the watch; past the cap it waits for the answer's end


@pytest.mark.parametrize("given", ["0", "-1", "five", "inf"])
def test_a_bad_keep_alive_setting_is_refused_naming_the_variable(monkeypatch, given):
    monkeypatch.setenv(http_wire.KEEP_ALIVE_ENV, given)
    with pytest.raises(ValueError, match="VLLM_HTTP_TIMEOUT_KEEP_ALIVE"):
        HttpFront("127.0.0.1", 0, 1)
    monkeypatch.setenv(http_wire.KEEP_ALIVE_ENV, "2.5")
    assert HttpFront("127.0.0.1", 0, 1).keep_alive_s == 2.5


def test_stopping_with_connections_open_logs_nothing():
    """stop() while one client waits to send its first request and another holds a kept connection: each handler
    ends as a finished task, so the event loop reports nothing (Python 3.11's start_server callback calls exception()
    on its handler's task: a cancelled one raised there, a traceback at every stop with a connection open)."""
    reported = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        up = await asyncio.start_server(_upstream, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], KEY, local=_Local())
        await front.start()
        silent = socket.create_connection(("127.0.0.1", front.port), timeout=10)  # sends nothing
        kept = socket.create_connection(("127.0.0.1", front.port), timeout=10)
        kept.sendall(_request(b"/version"))
        assert (await asyncio.to_thread(_read_answer, kept, bytearray())).startswith(b"HTTP/1.1 200")
        for _ in range(1000):  # both accepted and in their handlers (bounded: 10 s)
            if len(front._connections) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(front._connections) == 2
        await front.stop()
        up.close()
        await asyncio.sleep(0.05)  # the done-callbacks run
        silent.close()
        kept.close()

    asyncio.run(run())
    assert reported == []
