"""`moelink http-front` (issue 48): the HTTP front before an smg gateway started by hand (PD mode) carries vLLM's
structured-output fields and refuses what smg would drop, as the managed gateway's front does. A real
`moelink http-front` process before a stand-in upstream that records what reaches it (smg's place)."""
from __future__ import annotations

import http.client
import http.server
import json
import subprocess
import sys
import threading

import pytest

from moelink.engine.server.gateway.front_cli import PD_ROLES, hand_gateway_commands, hand_pd_gateway_commands
from tests.helpers.net import free_port
from tests.helpers import zygote
from tests.helpers.grpc_server import child_env


class _Upstream(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        _Upstream.seen.append((self.path, json.loads(body)))
        self._send(b'{"choices": [{"text": "left"}]}', "application/json")

    def do_GET(self):
        self._send(b"# TYPE smg_http_requests_total counter\nsmg_http_requests_total 3\n", "text/plain")

    def _send(self, body: bytes, kind: str):
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def front():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up = upstream.server_address[1]
    port = free_port()
    proc = zygote.popen([sys.executable, "-m", "moelink.engine.api.cli", "http-front", "--port", str(port),
                             "--upstream-port", str(up), "--upstream-metrics-port", str(up)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"moelink: OpenAI API front on http://127.0.0.1:{port}/v1"), line
        yield port
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        upstream.shutdown()
    assert proc.returncode == 0 and "front stopped" in out and "Traceback" not in out, out


def _call(port: int, method: str, path: str, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_hand_started_gateway_gets_vllms_fields_carried_and_drops_refused(front):
    _Upstream.seen.clear()
    status, _ = _call(front, "POST", "/v1/completions", {"model": "m", "prompt": "x", "guided_choice": ["left", "right"]})
    assert status == 200
    path, sent = _Upstream.seen[-1]
    assert path == "/v1/completions" and "guided_choice" not in sent and "left" in sent["ebnf"]  # carried as smg's
    status, body = _call(front, "POST", "/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1})
    assert status == 400 and json.loads(body)["error"]["param"] == "logprobs"
    status, body = _call(front, "POST", "/v1/chat/completions", {"model": "m", "messages": [],
                                                                 "structured_outputs": {"structural_tag": "{}"}})
    assert status == 400 and json.loads(body)["error"]["param"] == "structured_outputs.structural_tag"
    assert len(_Upstream.seen) == 1  # the refused ones never reached the gateway
    status, body = _call(front, "GET", "/metrics")
    assert status == 200 and b"smg_http_requests_total 3" in body
    assert _call(front, "GET", "/workers")[0] == 404  # smg's control plane stays closed


def test_the_serve_banner_prints_the_exact_commands():
    cmd = hand_gateway_commands("grpc://127.0.0.1:50051", ("--tool-call-parser", "qwen", "--chat-template", "a b.jinja"))
    assert cmd == ("smg launch --host 127.0.0.1 --port 8001 --worker-urls grpc://127.0.0.1:50051 --prometheus-host "
                   "127.0.0.1 --prometheus-port 29000 --tool-call-parser qwen --chat-template 'a b.jinja' & "
                   "moelink http-front --port 8000 --upstream-port 8001 --upstream-metrics-port 29000")


def test_a_prefill_or_decode_server_prints_smgs_pd_mode_before_the_front():
    """Issue 54 item 7: a `--no-http --role prefill|decode` server's hint is the PD pair's (its own address on its
    side, a placeholder for the other), not one worker's `--worker-urls`, with the front before smg."""
    front = " & moelink http-front --port 8000 --upstream-port 8001 --upstream-metrics-port 29000"
    tail = ("--host 127.0.0.1 --port 8001 --prometheus-host 127.0.0.1 --prometheus-port 29000 "
            "--model-alias tiny=m" + front)
    assert hand_pd_gateway_commands("prefill", "grpc://127.0.0.1:50061", "/models/m", ("--model-alias", "tiny=m")) == (
        "smg launch --pd-disaggregation --prefill grpc://127.0.0.1:50061 --decode grpc://DECODE_HOST:DECODE_PORT "
        "--model-path /models/m " + tail)
    assert hand_pd_gateway_commands("decode", "grpc://127.0.0.1:50062", "/models/m", ("--model-alias", "tiny=m")) == (
        "smg launch --pd-disaggregation --prefill grpc://PREFILL_HOST:PREFILL_PORT --decode grpc://127.0.0.1:50062 "
        "--model-path /models/m " + tail)
    cmd = hand_pd_gateway_commands("decode", "grpc://[::1]:9", "my models/m", smg_port=18001, http_port=18000,
                                   metrics_port=29001)
    assert "--model-path 'my models/m' " in cmd and "--port 18001 " in cmd and "--worker-urls" not in cmd
    assert cmd.endswith("moelink http-front --port 18000 --upstream-port 18001 --upstream-metrics-port 29001")
    assert PD_ROLES == {"kv_producer": "prefill", "kv_consumer": "decode"}  # kv_both (and "") print one worker's
    with pytest.raises(ValueError, match="'both'"):
        hand_pd_gateway_commands("both", "grpc://127.0.0.1:50051", "m")
