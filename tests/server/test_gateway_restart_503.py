"""Issue 54 item 8: a streamed chat got `503 the OpenAI gateway (smg) is restarting` with no restart logged.

The front (engine/server/gateway/http_front.py) answered that 503 for any error connecting to smg, whether or not smg was
down: an fd of the server closed under the front (grammar_forks.py closed pidfds twice), a transient connect
error, all read as "restarting". Now the 503 is answered only while the supervisor has smg down (its `not_serving`
reason, which the supervisor logs with each restart), a failed connect is tried again first, and anything else is
a 502 naming the error, logged. Every restart is logged with its reason: the exit status (a signal by name) and
smg's last error line. A stand-in smg (a small script) makes the restart certain and quick."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import time
import urllib.request

import pytest

from moelink.engine.server.gateway import supervisor as gw
from moelink.engine.server.gateway.http_front import HttpFront

from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request

# Serves /v1/models; `GET /crash` says why on stderr (coloured, as smg's log is) and exits 1.
FAKE_SMG = textwrap.dedent('''
    import http.server, json, os, sys
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/crash":
                print("\\x1b[31mERROR\\x1b[0m worker pool: the tokenizer broke", file=sys.stderr, flush=True)
                os._exit(1)
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture
def fake_smg(tmp_path):
    script = tmp_path / "smg"
    script.write_text(f"#!{sys.executable}\n{FAKE_SMG}")
    script.chmod(0o755)
    return script


def _front(upstream_port: int, not_serving) -> HttpFront:
    return HttpFront("127.0.0.1", free_port(), upstream_port, not_serving=not_serving)


def test_a_connect_error_while_smg_runs_is_a_502_logged_not_a_503(caplog):
    async def scenario():
        front = _front(free_port(), lambda: None)  # the supervisor says smg serves; nothing listens there
        await front.start()
        try:
            t0 = time.monotonic()
            got = await asyncio.to_thread(http_request, front.port, "GET", "/v1/models")
            return got, time.monotonic() - t0
        finally:
            await front.stop()

    with caplog.at_level(logging.ERROR, logger="moelink.engine.server.gateway.http_front"):
        (status, raw), took = asyncio.run(scenario())
    assert status == 502, raw
    assert b"could not be reached" in raw and b"restarting" not in raw, raw
    assert "could not reach the smg gateway" in caplog.text and "no restart of it is under way" in caplog.text
    assert took >= 0.4  # tried three times (0.1 s, 0.3 s apart) before answering


def test_a_front_before_a_hand_started_smg_that_is_down_says_so():
    async def scenario():
        front = HttpFront("127.0.0.1", free_port(), free_port())  # `moelink http-front`: no supervisor
        await front.start()
        try:
            return await asyncio.to_thread(http_request, front.port, "GET", "/v1/models")
        finally:
            await front.stop()

    status, raw = asyncio.run(scenario())
    assert status == 502 and b"could not be reached" in raw, raw


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_503_only_while_smg_is_restarted_and_each_restart_is_logged_with_its_reason(fake_smg, monkeypatch, caplog):
    monkeypatch.setattr(gw, "BACKOFF_S", (1.5,))  # time to ask while smg is down

    async def scenario():
        spec = gw.GatewaySpec(http_host="127.0.0.1", http_port=free_port(), worker_url="grpc://127.0.0.1:1")
        sup = gw.GatewaySupervisor(spec, str(fake_smg), ready_timeout=20)
        front = _front(spec.http_port, sup.not_serving)
        await sup.start()
        await front.start()
        try:
            assert await asyncio.to_thread(http_request, front.port, "GET", "/v1/models") == (200, b'{"data": [{"id": "m"}]}')
            first = sup.pid
            with pytest.raises(Exception):  # it exits answering nothing
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{spec.http_port}/crash", None, 5)
            while sup.not_serving() is None:
                await asyncio.sleep(0.01)
            down = await asyncio.to_thread(http_request, front.port, "GET", "/v1/models")
            for _ in range(200):  # bounded: 10 s
                if sup.restarts == 1:
                    break
                await asyncio.sleep(0.05)
            assert sup.restarts == 1 and sup.pid != first
            back = await asyncio.to_thread(http_request, front.port, "GET", "/v1/models")
            os.kill(sup.pid, signal.SIGKILL)  # a signal is logged by name
            for _ in range(200):
                if sup.restarts == 2:
                    break
                await asyncio.sleep(0.05)
            return down, back
        finally:
            await front.stop()
            await sup.stop()

    with caplog.at_level(logging.INFO, logger="moelink.engine.server.gateway.supervisor"):
        (status, raw), back = asyncio.run(scenario())
    assert status == 503 and b"is not running; it is being restarted (1 crashes so far)" in raw, raw
    assert back[0] == 200, back
    assert ("exited with 1 (smg's last error: ERROR worker pool: the tokenizer broke); restarting in 1.5 s"
            in caplog.text), caplog.text
    assert "exited with -9 (SIGKILL)" in caplog.text and "restarting in" in caplog.text, caplog.text
