"""Issue 41 medium 5, the parts that need no server: relay ids, the hang-up registry (engine/server/gateway/hangups.py),
the front reporting a client that left before smg answered (engine/server/gateway/http_front.py), and a compile
abandoned while its process starts (engine/core/grammar_compile.py). The end-to-end attack through smg is in
tests/server/test_http_hangup_compiles.py."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid

import pytest

from moelink.engine.server.gateway.hangups import (MAX_CLIENT_ID_CHARS, RELAY_HEADER, Abandoned, Hangups, new_relay_id,
                                           relay_of)
from moelink.engine.server.gateway.http_front import HttpFront

from tests.helpers.net import free_port


def test_relay_ids_are_random_keep_a_client_id_and_are_found_in_smg_request_ids():
    a, b = new_relay_id("chatcmpl"), new_relay_id("chatcmpl")
    assert a.startswith("chatcmpl-") and a != b and len(a) <= 128
    assert new_relay_id("cmpl", "trace-42").startswith("trace-42-")
    # A client id smg would not honour (spaces, too long, empty) is not kept: the kind is used.
    for bad in ("has space", "x" * (MAX_CLIENT_ID_CHARS + 1), "", "caf\u00e9"):
        assert new_relay_id("cmpl", bad).startswith("cmpl-"), bad
    # smg's gRPC request id is the header's value, "-", a UUID.
    assert relay_of(f"{a}-{uuid.uuid4()}") == a
    for other in ("req-1", "abc", str(uuid.uuid4()), f"-{uuid.uuid4()}"):
        assert relay_of(other) is None, other


def _run(coro):
    return asyncio.run(coro)


def test_a_hangup_ends_the_wait_and_cancels_the_work():
    async def scenario():
        h = Hangups()
        relay = new_relay_id("chatcmpl")
        rid = f"{relay}-{uuid.uuid4()}"
        cancelled = asyncio.Event()

        async def compile_forever():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(Abandoned, match=r"was abandoned: its HTTP client hung up"):
            with h.watch(rid) as w:
                asyncio.get_running_loop().call_later(0.05, h.hung_up, relay)
                t0 = time.monotonic()
                await w.unless_left(compile_forever())
        assert time.monotonic() - t0 < 2 and cancelled.is_set()
        assert h.preparing() == 0 and h.abandoned_total == 1
        # The same relay's call that arrives after the hang-up (smg still queued it) is refused at once.
        with pytest.raises(Abandoned, match="before it arrived"):
            with h.watch(f"{relay}-{uuid.uuid4()}"):
                pass
        # Another relay id, and an id that is no relay id, are untouched.
        with h.watch(f"{new_relay_id('chatcmpl')}-{uuid.uuid4()}") as w:
            assert await w.unless_left(asyncio.sleep(0, "done")) == "done"
        with h.watch(relay) as w:  # no UUID suffix: not a relayed call
            w.check()

    _run(scenario())


def test_an_abort_ends_a_request_still_being_prepared():
    async def scenario():
        h = Hangups()
        with pytest.raises(Abandoned, match=r"'x' was aborted \(an Abort call named it\)"):
            with h.watch("x") as w:
                asyncio.get_running_loop().call_later(0.05, h.abort, ["x", "y"])
                await w.unless_left(asyncio.sleep(3600))
        assert h.abort(["x"]) == 0  # nothing left to abort

    _run(scenario())


def test_the_work_finishing_first_wins_and_its_errors_are_its_own():
    async def scenario():
        h = Hangups()
        with h.watch("a") as w:
            assert await w.unless_left(asyncio.sleep(0.01, 7)) == 7

        async def bad():
            raise ValueError("sampling_params.regex is invalid")

        with pytest.raises(ValueError, match="regex is invalid"):
            with h.watch("b") as w:
                await w.unless_left(bad())

    _run(scenario())


def test_remembered_hangups_are_bounded_and_expire():
    h = Hangups(ttl_s=0.05, max_gone=3)
    relays = [new_relay_id("chatcmpl") for _ in range(5)]
    for r in relays:
        h.hung_up(r)
    assert not h._is_gone(relays[0]) and h._is_gone(relays[4])  # only the newest 3 are kept
    time.sleep(0.1)
    assert not h._is_gone(relays[4])  # and each for ttl_s
    assert len(h._gone) == 0


# -- the front ------------------------------------------------------------------------------------------------------
class _Upstream:
    """A stand-in for smg: records each request's head; answers after `answer_after` s, or never (None)."""

    def __init__(self, answer_after=None):
        self.answer_after = answer_after
        self.heads: list[dict] = []
        self.got = asyncio.Event()

    async def serve(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = dict(line.split(": ", 1) for line in lines if line)
        await reader.readexactly(int(headers["content-length"]))
        self.heads.append(headers)
        self.got.set()
        if self.answer_after is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.answer_after)
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()


def _post(port: int, headers: bytes = b"") -> socket.socket:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "regex": "[a-z]+"}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + headers +
              b"content-length: %d\r\n\r\n" % len(body) + body)
    return s


def _front_scenario(upstream: _Upstream, client):
    """Runs the front before `upstream`; `client(front_port)` runs on a thread. Returns (its result, hang-ups)."""
    async def scenario():
        hangups: list[str] = []

        async def on_hangup(relay_id):
            hangups.append(relay_id)

        up = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        front = HttpFront("127.0.0.1", free_port(), up.sockets[0].getsockname()[1], on_hangup=on_hangup)
        await front.start()
        try:
            result = await asyncio.to_thread(client, front.port)
            for _ in range(100):  # the front notices the EOF on its own loop
                if hangups:
                    break
                await asyncio.sleep(0.02)
            return result, hangups
        finally:
            await front.stop()
            up.close()

    return asyncio.run(scenario())


def test_the_front_reports_a_client_that_left_before_smg_answered():
    upstream = _Upstream(answer_after=None)  # a grammar that compiles for ever

    def client(port):
        s = _post(port, b"x-request-id: my-trace\r\n" + RELAY_HEADER.encode() + b": chatcmpl-forged\r\n")
        time.sleep(0.5)
        s.close()  # the client hangs up

    _, hangups = _front_scenario(upstream, client)
    [head] = upstream.heads
    relay = head[RELAY_HEADER]
    # The front's own relay id, the client's X-Request-Id kept at its start; the client's forged one dropped.
    assert relay.startswith("my-trace-") and "forged" not in json.dumps(head), head
    assert hangups == [relay]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_front_reports_nothing_once_the_answer_was_relayed():
    upstream = _Upstream(answer_after=0.2)

    def client(port):
        s = _post(port)
        s.settimeout(10)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data

    data, hangups = _front_scenario(upstream, client)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"ok": true}'), data
    assert hangups == []


# -- the compile pool -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_compile_abandoned_while_its_process_starts_keeps_the_start():
    """A flood of clients that hang up at once must not kill every compile process as it starts: the abandoned job
    is dropped, and the process serves the next one."""
    pytest.importorskip("xgrammar")
    from pathlib import Path

    from moelink.engine.config.grammar_config import GrammarConfig
    from moelink.engine.contract.structured_output_params import StructuredOutputParams
    from moelink.engine.core.structured_output import GrammarCompilerPool
    from moelink.engine.core.tokenizer import Tokenizer

    builtin = str(Path(__file__).resolve().parents[2] / "builtin-model")
    tok = Tokenizer.from_dir(builtin)
    pool = GrammarCompilerPool(tok, 4096, tok.eos_token_ids, GrammarConfig(timeout_s=30))
    # Processes started one by one (as without pidfds): a start takes seconds, where a fork takes milliseconds.
    pool._forks = None
    try:
        job = pool.submit(StructuredOutputParams(regex="[ab]+"))
        deadline = time.monotonic() + 10
        while job.worker is None and time.monotonic() < deadline:  # taken: its worker waits for the process
            time.sleep(0.005)
        worker = job.worker
        assert worker is not None and not worker.compiling
        pid = worker.proc.pid
        pool.release(job)
        assert job.future.cancelled() and pool.counts["abandoned_starting"] == 1
        assert pool.compile(StructuredOutputParams(regex="[cd]+")) is not None
        assert worker.proc.pid == pid and pool.counts["abandoned_running"] == 0  # the same process compiled it
    finally:
        pool.shutdown()
