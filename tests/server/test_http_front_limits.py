"""The OpenAI front's bounds on a client connection (issue 95; http_limits.HttpLimits, http_admission.py): the key and
the route judged from a request's head before any body is read, a body cap per route, head and body timeouts (for a
whole head or body, however it trickles in), an exact head bound (431), connection caps (the front's and each client
address's, an idle connection closed for a new one, one with a request in flight never), ambiguous framings refused
with 400, an answer nobody reads abandoned after the stall timeout, and an
answer that fails to be written logged, not dropped silently.

A front without an engine (nothing listens upstream: no request here is relayed), raw sockets on loopback: no model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest

from moelink.engine.server.gateway import http_admission
from moelink.engine.server.gateway.generate_route import Streamed
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.http_routes import SMALL_BODY_BYTES
from moelink.engine.server.gateway.http_limits import HttpLimits, add_http_limit_args, http_limits_from

from tests.helpers.net import free_port

KEY = "k3y"
AUTH = b"authorization: Bearer " + KEY.encode() + b"\r\n"


class _Local:
    """The engine's routes beside the front: none answered here."""

    base_name = "m"

    async def answer(self, method, path, body, query, client=()):
        return None


class _Endless:
    """A completions route whose stream never ends (64 KiB per chunk), counting what it made and its stops."""

    def __init__(self):
        self.made = 0
        self.stopped = asyncio.Event()

    async def claim(self, body, client=(), header_id=None):
        async def chunks():
            while True:
                self.made += 1
                yield b"data: " + b"x" * (64 << 10) + b"\n\n"
                await asyncio.sleep(0)

        async def stop():
            self.stopped.set()

        async def answering():
            return Streamed(chunks(), stop)
        return answering()


class _Failing:
    """A completions route whose answer cannot be made (as a lone surrogate in a JSON answer once could not)."""

    async def claim(self, body, client=(), header_id=None):
        async def answering():
            "\ud800".encode()  # UnicodeEncodeError
        return answering()


class _Held:
    """A completions route whose answer never comes: each request stays in flight until its client leaves. Counts
    the requests begun and ended."""

    def __init__(self):
        self.begun = self.ended = 0

    async def claim(self, body, client=(), header_id=None):
        async def answering():
            self.begun += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.ended += 1
        return answering()


def _scenario(client, limits=None, completions=None, serving: bool = False):
    """Runs a front (API key KEY; its engine routes stand-ins when `completions` is given; `serving`: its probes
    answer 200 as beside a gateway that serves) and `client(front)` on a thread; `client`'s result."""
    async def run():
        front = HttpFront("127.0.0.1", free_port(), free_port(), KEY, limits=limits,
                          not_serving=(lambda: None) if serving else None,
                          local=_Local() if completions is not None else None, completions=completions)
        await front.start()
        try:
            return await asyncio.to_thread(client, front)
        finally:
            await front.stop()

    return asyncio.run(run())


def _connect(front, timeout: float = 10, source: str = "127.0.0.1") -> socket.socket:
    """A connection to the front from `source` (any of 127/8 reaches loopback on Linux: another client address)."""
    return socket.create_connection(("127.0.0.1", front.port), timeout=timeout, source_address=(source, 0))


def _until(predicate, within: float = 10.0) -> bool:
    """Polls `predicate` every 10 ms for at most `within` seconds; its last value."""
    end = time.monotonic() + within
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def _closed(sock: socket.socket) -> bool:
    """Whether the front closed `sock` (EOF or a reset waiting), without waiting for it."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def _get(front, path: bytes, source: str = "127.0.0.1") -> bytes:
    sock = _connect(front, source=source)
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    return _until_eof(sock)


def _until_eof(sock: socket.socket, done_sending: bool = True) -> bytes:
    """Everything the front sends until it closes (bounded by the socket's timeout). `done_sending`: the client
    closes its sending side first, which ends the front's lingering drain after a refusal at once."""
    if done_sending:
        sock.shutdown(socket.SHUT_WR)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _error(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def _post_head(path: bytes, length: int, extra: bytes = b"") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nhost: x\r\n" + extra + b"content-length: %d\r\n\r\n" % length


def test_a_keyless_body_is_refused_from_its_head_and_left_unread():
    """Issue 95 item 1: a keyless 64 MiB body to a keyed route gets 401 from its head, the client having sent none of
    it, and the connection closes (after a short drain) rather than wait for it; so does a 404 path, keyed or not."""
    def client(front):
        out = []
        for path, extra in ((b"/v1/chat/completions", b""), (b"/generate", b""), (b"/nope", b""),
                            (b"/workers", AUTH)):
            sock = _connect(front)
            sock.sendall(_post_head(path, 64 << 20, extra))  # the head only: not a byte of the body
            out.append(_until_eof(sock))
        return out

    unauthorized, generate, missing, control = _scenario(client)
    for answer in (unauthorized, generate):
        assert _status(answer) == 401 and b"connection: close" in answer.lower(), answer[:300]
        assert b"www-authenticate: Bearer" in answer
    for answer in (missing, control):
        assert _status(answer) == 404 and answer.endswith(b'{"detail":"Not Found"}'), answer[:300]


def test_a_bodyless_request_refused_from_its_head_keeps_its_connection():
    """A 404 or 401 to a request without a body is answered on a kept connection like any answer."""
    def client(front):
        sock = _connect(front)
        data = b""
        sock.sendall(b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            data += sock.recv(65536)
        sock.close()
        return data

    data = _scenario(client)
    assert data.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 401" in data and b"connection: close" not in data.lower()


def test_each_route_has_its_body_cap_from_content_length_and_while_chunked():
    """413 naming the flag: vLLM's routes parsed here (--max-http-openai-body-bytes), the other relayed ones
    (--max-http-relay-body-bytes), a request with no body to give (GET, the probes) a small cap; a chunked body is
    refused as it passes the cap."""
    limits = HttpLimits(max_openai_body_bytes=4096, max_relay_body_bytes=8192)

    def client(front):
        out = {}
        for name, path, length in (("openai", b"/v1/completions", 4097), ("relay", b"/v1/embeddings", 8193),
                                   ("probe", b"/ping", SMALL_BODY_BYTES + 1)):
            sock = _connect(front)
            sock.sendall(_post_head(path, length, AUTH))
            out[name] = _until_eof(sock)
        sock = _connect(front)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"transfer-encoding: chunked\r\n"
                     b"\r\n" + (b"800\r\n" + b"x" * 2048 + b"\r\n") * 3)
        out["chunked"] = _until_eof(sock)
        return out

    out = _scenario(client, limits)
    for name, flag in (("openai", b"--max-http-openai-body-bytes"), ("relay", b"--max-http-relay-body-bytes"),
                       ("chunked", b"--max-http-openai-body-bytes"), ("probe", b"without a body")):
        answer = out[name]
        assert _status(answer) == 413 and flag in answer and b"connection: close" in answer.lower(), (name, answer)


def test_a_lora_load_or_unload_is_capped_at_a_small_body_from_content_length():
    """A LoRA load or unload (vLLM's, SGLang's, SkyRL's names) takes a name and a path: 413 past SMALL_BODY_BYTES
    from its Content-Length, before the route's JSON would be parsed on the event loop (it took the relay cap, 64 MiB:
    a 60 MB body held every stream 5.5 s)."""
    paths = (b"/v1/load_lora_adapter", b"/v1/unload_lora_adapter", b"/load_lora_adapter", b"/unload_lora_adapter",
             b"/skyrl/v1/load_lora_adapter")

    def client(front):
        out = {}
        for path in paths:
            sock = _connect(front)
            sock.sendall(_post_head(path, SMALL_BODY_BYTES + 1, AUTH))
            out[path] = _until_eof(sock)
        return out

    for path, answer in _scenario(client, completions=_Endless()).items():  # the engine's routes beside the front
        assert _status(answer) == 413 and b"LoRA load or unload" in answer, (path, answer)


def test_a_silent_or_slow_connection_is_closed_past_the_head_and_body_timeouts():
    """Issue 95 item 2: a connection that sends nothing, or half a head, is closed once the head timeout passes
    (the first request included); a body that does not arrive in time gets 408."""
    limits = HttpLimits(head_timeout_s=0.3, body_timeout_s=0.3)

    def client(front):
        out = {}
        for name, sent in (("silent", b""), ("half", b"GET /version HT"),
                           ("body", _post_head(b"/v1/completions", 10, AUTH) + b"{}")):
            sock = _connect(front, timeout=5)
            sock.sendall(sent)
            start = time.monotonic()
            out[name] = (_until_eof(sock, done_sending=False), time.monotonic() - start)
        return out

    out = _scenario(client, limits)
    assert out["silent"][0] == b"" and out["half"][0] == b""
    assert _status(out["body"][0]) == 408 and b"--http-body-timeout" in out["body"][0]
    for name, (_, took) in out.items():
        assert took < 3, (name, took)  # the socket's own timeout is 5 s


def test_past_the_connection_cap_with_none_idle_a_new_connection_gets_503_and_is_closed():
    """Issue 95 item 2: with --http-max-connections 2 held by requests in flight, a third connection is answered 503
    (vLLM's error body naming the flag, `connection: close`) and closed at once; neither busy connection is closed
    for it; once one leaves, a new one is served."""
    route = _Held()

    def client(front):
        held = []
        for _ in range(2):
            sock = _connect(front)
            sock.sendall(_post_head(b"/v1/completions", 2, AUTH) + b"{}")
            held.append(sock)
        assert _until(lambda: route.begun == 2)
        refused = _until_eof(_connect(front, source="127.0.0.2"))  # another client: under its own cap
        alive = route.ended == 0 and not any(_closed(sock) for sock in held)
        held.pop().close()
        assert _until(lambda: route.ended == 1)
        served = b""
        for _ in range(50):  # bounded: the front sees the close within its loop's next turns
            served = _get(front, b"/version")
            if _status(served) == 200:
                break
            time.sleep(0.05)
        for sock in held:
            sock.close()
        return refused, alive, served

    refused, alive, served = _scenario(client, HttpLimits(max_connections=2, max_connections_per_client=2),
                                       completions=route)
    assert _status(refused) == 503 and b"connection: close" in refused.lower(), refused
    assert _error(refused)["code"] == 503 and "--http-max-connections)" in _error(refused)["message"]
    assert alive  # a request in flight is never evicted
    assert _status(served) == 200, served


def test_one_client_past_its_cap_closes_its_own_idle_connection_or_gets_503_while_another_is_served():
    """Issue 95: one client address holding --http-max-connections-per-client connections: a new one of its own
    takes the place of its longest idle one (a probe on the same host as an idle hog is served: /health 200); with
    all of them in flight, one more gets 503 naming the flag, and another address (127.0.0.2) is still served."""
    route = _Held()

    def client(front):
        hog = []
        for _ in range(3):
            hog.append(_connect(front))
            time.sleep(0.02)  # accepted in this order: idle in this order
        assert _until(lambda: front.table.count == 3)
        own = _get(front, b"/health")
        evicted = [_until(lambda: _closed(hog[0]), 5)] + [_closed(sock) for sock in hog[1:]]
        hog[0].close()
        hog[0] = _connect(front)
        for sock in hog:
            sock.sendall(_post_head(b"/v1/completions", 2, AUTH) + b"{}")
        assert _until(lambda: route.begun == 3)
        refused = _until_eof(_connect(front))
        other = _get(front, b"/health", source="127.0.0.2")
        kept = route.ended == 0 and not any(_closed(sock) for sock in hog)
        for sock in hog:
            sock.close()
        return own, evicted, refused, other, kept

    own, evicted, refused, other, kept = _scenario(
        client, HttpLimits(max_connections=8, max_connections_per_client=3), completions=route, serving=True)
    assert _status(own) == 200 and evicted == [True, False, False], (own, evicted)
    assert _status(refused) == 503 and b"connection: close" in refused.lower(), refused
    assert "--http-max-connections-per-client" in _error(refused)["message"]
    assert _status(other) == 200, other
    assert kept  # a request in flight is never evicted


def test_at_the_cap_an_idle_connection_of_the_client_holding_most_is_closed_for_a_new_one():
    """Issue 95: 20,000 keyless idle connections shut the API out. At --http-max-connections, a new client's
    connection takes the place of an idle one: of the client holding the most (not an older idle one of a client
    holding fewer), its longest idle; /health answers 200; a connection with a request in flight is never closed."""
    route = _Held()

    def client(front):
        few = _connect(front, source="127.0.0.3")  # the oldest idle connection, of a client holding one
        time.sleep(0.05)
        busy = _connect(front)
        busy.sendall(_post_head(b"/v1/completions", 2, AUTH) + b"{}")
        assert _until(lambda: route.begun == 1)
        hog = []
        for _ in range(4):
            hog.append(_connect(front))
            time.sleep(0.02)  # accepted in this order: idle in this order
        assert _until(lambda: front.table.count == 6)
        health = _get(front, b"/health", source="127.0.0.2")
        state = {"hog": [_until(lambda: _closed(hog[0]), 5)] + [_closed(sock) for sock in hog[1:]],
                 "few": _closed(few), "busy": _closed(busy) or route.ended > 0, "evicted": front.table.evicted}
        for sock in [few, busy, *hog]:
            sock.close()
        return health, state

    health, state = _scenario(client, HttpLimits(max_connections=6, max_connections_per_client=6),
                              completions=route, serving=True)
    assert _status(health) == 200, health
    assert state == {"hog": [True, False, False, False], "few": False, "busy": False, "evicted": 1}, state


def test_the_connection_table_evicts_from_the_client_holding_most_its_longest_idle():
    """http_admission.ConnectionTable against a plain model, over random admissions, requests and closes: each
    eviction takes a longest idle connection: the client's own past its cap, else of a client holding the most
    among those with one idle; a busy one never; a refusal only at a cap with none idle to close."""
    import random

    from moelink.engine.server.gateway.http_admission import ALL, PER_CLIENT, ConnectionTable, Slot

    class _Writer:
        def __init__(self):
            self.closed = False

        def close(self):
            self.closed = True

    rng = random.Random(7)
    table = ConnectionTable(most=12, per_client=5)
    open_, idle_since, clock, seen = [], {}, 0, set()
    for _ in range(3000):
        clock += 1
        step = rng.random()
        if step < 0.5:
            client = rng.choice("abcdef")
            held = {c: sum(1 for s in open_ if s.client == c) for c in "abcdef"}
            idle = [s for s in open_ if s in idle_since]
            most = max((held[s.client] for s in idle), default=None)
            got = table.admit(client, _Writer())
            own = held[client] >= 5
            if own and not any(s.client == client for s in idle):
                assert got == PER_CLIENT
                seen.add("per-client refused")
                continue
            if not own and len(open_) >= 12 and not idle:
                assert got == ALL
                seen.add("refused")
                continue
            assert isinstance(got, Slot)
            if own or len(open_) >= 12:
                gone = [s for s in open_ if s.writer.closed]
                assert len(gone) == 1 and gone[0] in idle_since
                assert gone[0].client == client if own else held[gone[0].client] == most
                seen.add("own evicted" if own else "evicted")
                assert idle_since[gone[0]] == min(idle_since[s] for s in idle if s.client == gone[0].client)
                open_.remove(gone[0])
                del idle_since[gone[0]]
            table.idle(got)
            open_.append(got)
            idle_since[got] = clock
            if rng.random() < 0.7:  # its request's head comes at once
                assert table.busy(got)
                del idle_since[got]
        elif open_:
            slot = rng.choice(open_)
            if step < 0.8:
                assert table.busy(slot)
                idle_since.pop(slot, None)
            elif step < 0.88:
                table.idle(slot)
                idle_since.setdefault(slot, clock)
            else:
                table.release(slot)
                open_.remove(slot)
                idle_since.pop(slot, None)
        assert table.count == len(open_) and not any(s.writer.closed for s in open_)
        assert len(table._heap) <= 2 * 6 + 64 + 1  # stale entries dropped: bounded by the clients, not the steps
    assert seen == {"per-client refused", "refused", "own evicted", "evicted"}, seen


@pytest.mark.parametrize("head", [
    b"content-length: 5\r\ntransfer-encoding: chunked\r\n",  # h11 reads it as chunked: refused here
    b"content-length: 5\r\ncontent-length: 5\r\n",  # h11 merges equal ones: refused here
    b"content-length: 5, 5\r\n",
    b"content-length: +5\r\n",  # h11 refuses these itself: answered 400, not dropped
    b"content-length: 5\r\ncontent-length: 6\r\n",
    b"transfer-encoding: gzip\r\n",
    b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
])
def test_an_ambiguous_framing_is_answered_400_and_closed(head):
    """Issue 95 item 4: a framing a proxy could read otherwise (request smuggling) gets 400 in vLLM's shape and the
    connection closes, never an answer to the request, nor a silent drop."""
    def client(front):
        sock = _connect(front)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + head + b"\r\nhello")
        return _until_eof(sock)

    answer = _scenario(client)
    assert _status(answer) == 400 and b"connection: close" in answer.lower(), answer
    assert _error(answer)["code"] == 400


def test_a_request_line_h11_cannot_read_is_answered_400():
    def client(front):
        sock = _connect(front)
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        return _until_eof(sock, done_sending=False)  # answered while the client could still send

    assert _status(_scenario(client)) == 400


def test_two_authorization_headers_never_authorize():
    """Issue 95 item 4: with two Authorization headers the last one decided; now neither does (401)."""
    def client(front):
        out = []
        for auth in (b"authorization: Bearer nope\r\n" + AUTH, AUTH + AUTH):
            sock = _connect(front)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + auth + b"\r\n")
            out.append(_until_eof(sock))
        return out

    for answer in _scenario(client):
        assert _status(answer) == 401, answer


def test_a_stream_nobody_reads_is_ended_after_the_stall_timeout():
    """Issue 95 item 3: a client that sends a request and reads nothing of its stream: the front stops asking the
    stream for chunks once the socket's buffers are full, ends the request (the Streamed's stop) after
    --http-stall-timeout, and drops the connection."""
    route = _Endless()

    def client(front):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", front.port))
        body = b'{"prompt": "x", "stream": true}'
        sock.sendall(_post_head(b"/v1/completions", len(body), AUTH) + body)
        start = time.monotonic()
        while not route.stopped.is_set() and time.monotonic() - start < 10:
            time.sleep(0.05)
        took = time.monotonic() - start
        sock.close()
        return took

    took = _scenario(client, HttpLimits(stall_timeout_s=0.5), completions=route)
    assert route.stopped.is_set() and took < 5, took
    assert route.made < 1024, route.made  # < 64 MiB made: the front's buffer stayed bounded


def test_an_answer_that_fails_is_logged_and_answered_500(caplog):
    """Issue 95 item 5: an answer the front fails to make (a bug of a route) is logged once and answered 500, not
    dropped with a closed connection and nothing said."""
    def client(front):
        sock = _connect(front)
        sock.sendall(_post_head(b"/v1/completions", 2, AUTH) + b"{}")
        return _until_eof(sock)

    with caplog.at_level(logging.ERROR, logger="moelink.engine.server.gateway"):
        answer = _scenario(client, completions=_Failing())
    assert _status(answer) == 500, answer
    failures = [r for r in caplog.records if "failed answering" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is UnicodeEncodeError


def test_accept_failures_are_said_once_in_a_while_without_a_traceback(caplog):
    """Issue 95 item 2: asyncio reports each accept() that fails for want of file descriptors with a traceback
    (tens of MB of log a minute); the front's handler says it in one line at most every 10 s, and passes any other
    error on."""
    others = []

    async def run():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: others.append(ctx))
        http_admission.quiet_accept_failures(loop)
        http_admission.quiet_accept_failures(loop)  # once is enough: not wrapped twice
        for _ in range(100):
            loop.call_exception_handler({"message": http_admission.ACCEPT_FAILED,
                                         "exception": OSError(24, "Too many open files")})
        loop.call_exception_handler({"message": "something else"})

    http_admission._accept_log.last = float("-inf")
    with caplog.at_level(logging.WARNING, logger="moelink.engine.server.gateway"):
        asyncio.run(run())
    lines = [r for r in caplog.records if "could not accept" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "EMFILE" in lines[0].getMessage()
    assert [ctx["message"] for ctx in others] == ["something else"]


def test_the_connection_cap_leaves_file_descriptors_for_the_rest(monkeypatch):
    monkeypatch.setattr(http_admission, "raise_fd_limit", lambda: 1024)
    assert http_admission.connection_cap(100) == 100
    assert http_admission.connection_cap(5000) == (1024 - http_admission.FD_RESERVE) // 2


@pytest.mark.parametrize("name, value, flag", [
    ("max_connections", 0, "--http-max-connections"), ("head_timeout_s", 0, "--http-head-timeout"),
    ("body_timeout_s", float("inf"), "--http-body-timeout"), ("stall_timeout_s", -1, "--http-stall-timeout"),
    ("max_openai_body_bytes", 1.5, "--max-http-openai-body-bytes"),
    ("max_relay_body_bytes", True, "--max-http-relay-body-bytes"),
    ("max_connections_per_client", 0, "--http-max-connections-per-client")])
def test_a_bad_limit_is_refused_naming_its_flag(name, value, flag):
    with pytest.raises(ValueError, match=flag):
        HttpLimits(**{name: value})


def test_the_flags_make_the_limits():
    import argparse

    p = argparse.ArgumentParser()
    add_http_limit_args(p)
    assert http_limits_from(p.parse_args([])) == HttpLimits()
    got = http_limits_from(p.parse_args(["--http-max-connections", "7", "--http-stall-timeout", "2.5",
                                         "--max-http-openai-body-bytes", "1000"]))
    assert (got.max_connections, got.stall_timeout_s, got.max_openai_body_bytes) == (7, 2.5, 1000)
    assert got.max_connections_per_client is None and got.per_client(7) == 3
    assert HttpLimits().per_client(1024) == 512  # `vllm bench serve --max-concurrency 512` from one address
    got = http_limits_from(p.parse_args(["--http-max-connections-per-client", "2000"]))
    assert got.max_connections_per_client == 2000 and got.per_client(1024) == 1024  # never above the front's cap


def test_a_relayed_answer_nobody_reads_is_ended_after_the_stall_timeout():
    """The same for an answer relayed from smg: the front stops copying once the client's socket is full, and past
    the stall timeout reports the client gone (the server ends the request) and drops the connection."""
    hung_up = []

    async def upstream(reader, writer):  # a stand-in smg whose answer never ends
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n")
        try:
            while True:
                writer.write(b"x" * (64 << 10))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            writer.close()

    def client(front):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", front.port))
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + AUTH + b"\r\n")
        start = time.monotonic()
        while not hung_up and time.monotonic() - start < 10:
            time.sleep(0.05)
        sock.close()
        return time.monotonic() - start

    async def run():
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)

        async def on_hangup(relay_id):
            hung_up.append(relay_id)

        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], KEY, on_hangup=on_hangup,
                          limits=HttpLimits(stall_timeout_s=0.5))
        await front.start()
        try:
            return await asyncio.to_thread(client, front)
        finally:
            await front.stop()
            up.close()

    took = asyncio.run(run())
    assert len(hung_up) == 1 and took < 5, (hung_up, took)


def test_the_head_bound_is_exact():
    """A head of 64 KiB, its blank line included, is read; one byte more is answered 431 (h11 alone took a head that
    completed within the read that passed its bound, up to about twice it)."""
    from moelink.engine.server.gateway.relay import MAX_HEAD_BYTES

    def head(size: int) -> bytes:
        start, end = b"GET /version HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: ", b"\r\n\r\n"
        return start + b"a" * (size - len(start) - len(end)) + end

    def client(front):
        out = []
        for size in (MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1):
            sock = _connect(front)
            sock.sendall(head(size))
            out.append(_until_eof(sock))
        return out

    exact, over = _scenario(client)
    assert _status(exact) == 200, exact[:200]
    assert _status(over) == 431 and str(MAX_HEAD_BYTES) in _error(over)["message"], over[:300]


def _trickle(front, first: bytes, byte: bytes, every: float, most: float) -> tuple[bytes, float]:
    """Sends `first`, then `byte` every `every` seconds for at most `most` seconds, until the front answers or
    closes; (what it sent back, how long that took)."""
    import select

    sock = _connect(front, timeout=5)
    sock.sendall(first)
    start = time.monotonic()
    while time.monotonic() - start < most:
        if select.select([sock], [], [], every)[0]:
            break
        try:
            sock.sendall(byte)
        except OSError:  # closed by the front
            break
    return _until_eof(sock, done_sending=False), time.monotonic() - start


def test_a_head_or_a_body_trickled_byte_by_byte_is_bounded_as_a_whole():
    """Issue 95: a slowloris sending one header byte every 0.1 s is closed at the head timeout, counted from the
    accept for the whole head (not per read); a body dribbled the same way gets 408 at the body timeout."""
    limits = HttpLimits(head_timeout_s=0.5, body_timeout_s=0.5)

    def client(front):
        head = _trickle(front, b"GET /version HTTP/1.1\r\nhost: x\r\nx-slow: ", b"a", 0.1, 5)
        body = _trickle(front, _post_head(b"/v1/completions", 1000, AUTH) + b"{", b" ", 0.1, 5)
        return head, body

    (head, head_took), (body, body_took) = _scenario(client, limits, completions=_Held())
    assert head == b"" and head_took < 2, (head, head_took)
    assert _status(body) == 408 and b"--http-body-timeout" in body and body_took < 2, (body, body_took)


def test_a_head_far_over_64_kib_is_answered_431():
    """h11 refuses a head still incomplete past 64 KiB (one that completes within the read that passes it is read)."""
    def client(front):
        sock = _connect(front)
        sock.sendall(b"GET /version HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (200 << 10) + b"\r\n\r\n")
        return _until_eof(sock)

    answer = _scenario(client)
    assert _status(answer) == 431 and _error(answer)["code"] == 431, answer[:200]


def test_a_batch_nobody_reads_holds_no_queue_of_outputs():
    """Issue 95 item 3: the prompts of one request (completions' or /generate's batch) are merged through a bounded
    queue: while its consumer (the front, blocked writing to a client that reads nothing) takes nothing, each
    prompt's stream is no longer pulled, so its outputs wait under the engine's own bound, not in a queue here."""
    from moelink.engine.server.gateway.generate_route import _Runs

    pulled = [0, 0, 0]

    async def stream(i):
        while True:
            pulled[i] += 1
            yield 0, b"out"
            await asyncio.sleep(0)

    async def run():
        runs = _Runs([stream(i) for i in range(3)], [])
        merged = runs.__aiter__()
        await merged.__anext__()  # one taken, then none
        await asyncio.sleep(0.1)
        before = sum(pulled)
        await asyncio.sleep(0.1)
        after = sum(pulled)
        await merged.aclose()
        await runs.aclose()
        return before, after

    before, after = asyncio.run(run())
    assert before == after <= 3 + 3 + 1, (before, after)  # the queue's 3, one blocked put per prompt, the one taken


def test_a_client_is_its_ipv4_address_or_its_ipv6_64():
    """--http-max-connections-per-client counts an IPv4 address (an IPv4-mapped IPv6 one read as it) or an IPv6
    /64 (a client may send from any address of its /64) as one client; a Unix socket's connections as one."""
    from moelink.engine.server.gateway.http_admission import client_address

    assert client_address(("127.0.0.1", 5)) == "127.0.0.1"
    assert client_address(("::ffff:10.0.0.1", 5, 0, 0)) == "10.0.0.1"
    assert client_address(("2001:db8::1", 5, 0, 0)) == client_address(("2001:db8::ffff:2", 6, 0, 0)) == \
        "2001:db8::/64"
    assert client_address(("fe80::1%eth0", 5, 0, 0)) == "fe80::/64"
    assert client_address("") == client_address(None) == ""
