"""Issue 41 medium 5: HTTP clients that hang up must not leave their grammar compiles to run.

Through `moelink serve --http-port` (the managed smg gateway) on the built-in model. smg 1.13 keeps its gRPC call
to the server open when its HTTP client leaves before the answer starts (streamed or not) and during a
non-streamed answer; the server's HTTP front reports the hang-up and the server ends the request
(engine/server/gateway/hangups.py). Six clients send expensive regexes (each tens of seconds to compile, past the 10 s
limit) and hang up after one second: their compiles are dropped or killed at once, and another user's
structured request sent next has its first token within 2x of the same request on the idle server (or 1.5 s, the
suite's noise); a stream running meanwhile keeps its inter-token gap within the same bound. A non-streamed generation whose client left is
aborted, and the gRPC side keeps its own: an Abort RPC reaches a request whose grammar still compiles.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest

from tests.helpers.grpc_server import ServerProcess
from tests.helpers.net import free_port
from tests.helpers.slow_specs import expensive_regex
from tests.helpers.smg_gateway import smg_executable

pytest.importorskip("xgrammar")

BUILTIN = str(Path(__file__).resolve().parents[2] / "builtin-model")
FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "256", "--served-model-name", "m",
         "--metrics-port", "0"]
MESSAGES = [{"role": "user", "content": "Say a word."}]


@pytest.fixture(scope="module")
def srv():
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    http_port = free_port()
    server = ServerProcess(BUILTIN, FLAGS + ["--http-port", str(http_port)])
    try:
        server.wait_for_line(r"moelink: OpenAI API on", 60, "the OpenAI API line")
        m = server.wait_for_line(r"moelink: metrics on http://[^:]+:(\d+)/metrics", 5, "the metrics line")
        server.http_port, server.metrics_port = http_port, int(m.group(1))
        yield server
    finally:
        server.stop()
        server.close()


def _send(port: int, body: dict, headers: bytes = b"") -> socket.socket:
    data = json.dumps({"model": "m", "messages": MESSAGES, **body}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + headers +
              b"content-length: %d\r\n\r\n" % len(data) + data)
    return s


def _hang_up_after(port: int, body: dict, seconds: float, headers: bytes = b"") -> bytes:
    """A client that sends `body` and closes its connection after `seconds`, whatever it got by then."""
    s = _send(port, body, headers)
    got, end = b"", time.monotonic() + seconds
    try:
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    finally:
        s.close()
    return got


def _stream(port: int, body: dict) -> tuple[float, float, str]:
    """(time to the first content, worst gap between two content events, the text) of a streamed chat."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "messages": MESSAGES, "stream": True, **body}), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        first, prev, worst, text = None, None, 0.0, ""
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if not delta:
                continue
            now = time.monotonic()
            first = now - t0 if first is None else first
            worst = max(worst, now - prev) if prev is not None else worst
            prev, text = now, text + delta
        return first, worst, text
    finally:
        conn.close()


def _metrics(srv) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^moelink_grammar_compiles_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def _ttft(port: int, k: int) -> float:
    # A cheap regex of its own each time: a compiled one is cached, and the point is to compile behind the attack.
    first, _, text = _stream(port, {"max_tokens": 4, "temperature": 0, "regex": f"[a-z]{{1,{k}}}"})
    assert re.fullmatch("[a-z]+", text), text
    return first


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_hung_up_compiles_are_dropped_and_others_are_served_promptly(srv):
    port = srv.http_port
    _ttft(port, 3)  # the compile process is warm
    base_ttft = min(_ttft(port, k) for k in range(4, 7))
    stream_body = {"max_tokens": 300, "temperature": 0, "ignore_eos": True}
    base_gap = min(_stream(port, stream_body)[1] for _ in range(2))
    before = _metrics(srv)

    # Six attackers at once (three streamed), each leaving after 1 s; meanwhile another user streams.
    attackers = [threading.Thread(target=_hang_up_after, args=(port, {
        "max_tokens": 8, "regex": expensive_regex(800, seed), "stream": seed % 2 == 0}, 1.0)) for seed in range(6)]
    streamed: dict = {}
    user = threading.Thread(target=lambda: streamed.update(zip(("ttft", "gap", "text"), _stream(port, stream_body))))
    t0 = time.monotonic()
    for t in attackers + [user]:
        t.start()
    for t in attackers:
        t.join(30)
    time.sleep(0.3)  # the hang-ups reach the server
    first = _ttft(port, 7)
    ttft = min(first, *(_ttft(port, k) for k in (8, 9)))  # the best of three, as the idle one: machine noise
    user.join(120)
    after = _metrics(srv)
    elapsed = time.monotonic() - t0
    logs = srv.logs()
    print(f"\nTTFT of a structured request: idle {base_ttft * 1e3:.0f} ms, after 6 hung-up compiles "
          f"{ttft * 1e3:.0f} ms (the first {first * 1e3:.0f} ms); worst token gap of a stream: idle "
          f"{base_gap * 1e3:.0f} ms, under the attack "
          f"{streamed['gap'] * 1e3:.0f} ms; compiles {dict((k, after.get(k, 0) - before.get(k, 0)) for k in after)}")

    abandoned = sum(after[k] - before.get(k, 0) for k in ("abandoned_queued", "abandoned_starting",
                                                           "abandoned_running"))
    assert abandoned == 6, (before, after)
    assert after["timed_out"] == before.get("timed_out", 0)  # not one was compiled to the limit
    # Each ended by the front's report of the hang-up, or by smg's own Abort or cancel when it drops a stream,
    # whichever reached the request first (the metrics above count them all).
    assert re.search(r"HTTP client hung up: 1 request\(s\) of relay id \S+ ended \(1 being prepared", logs)
    assert elapsed < 10  # on the old code: 60 s of compiles to the limit before the next structured request
    assert first < 1  # no compile process to start either (a fork of the fork server takes milliseconds)
    # A compile that held the engine (the defect: each runs tens of seconds) shows as seconds of wait; the bound is
    # 2x the idle value or 1.5 s, whichever is larger, because the suite's other worker shares this 2-core machine
    # and its bursts reach a few hundred ms (a 2x-plus-100-ms bound failed under `make test`, never alone). The
    # numbers printed above are the measurement.
    assert ttft <= max(2 * base_ttft, 1.5), (base_ttft, ttft)
    assert streamed["gap"] <= max(2 * base_gap, 1.5), (base_gap, streamed["gap"])


def test_a_non_streamed_generation_whose_client_left_is_aborted(srv):
    # smg itself lets it run to max_tokens: it does not notice the hang-up until it writes the whole answer. A
    # constraint keeps the chat smg's (the front answers a plain chat itself: tests/server/test_chat_route.py).
    trace = f"gone-{uuid.uuid4().hex[:8]}"  # the client's X-Request-Id starts the request id the server logs
    _hang_up_after(srv.http_port, {"max_tokens": 480, "ignore_eos": True, "temperature": 0, "regex": "[a-z ]+"}, 0.3,
                   headers=f"x-request-id: {trace}\r\n".encode())
    line = re.compile(rf"request finished request_id={trace}-\S+ .*completion_tokens=(\d+) .*finish_reason=(\w+)")
    m = None
    deadline = time.monotonic() + 30
    while m is None and time.monotonic() < deadline:
        m = line.search(srv.logs())
        time.sleep(0.1)
    # Ended by the server's abort ("abort"), or by smg cancelling its call as the abort reached it ("cancelled").
    assert m is not None and m.group(2) in ("abort", "cancelled") and int(m.group(1)) < 480, srv.logs()[-3000:]
    assert re.search(rf"HTTP client hung up: 1 request\(s\) of relay id {trace}-\S+ ended \(0 being prepared, 1 "
                     rf"generating\)", srv.logs())


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_an_abort_rpc_reaches_a_request_whose_grammar_compiles(srv):
    """The gRPC side: smg's (and any vLLM client's) Abort by request id ends a request still compiling, which the
    Abort used to miss (it looked at admitted requests only)."""
    from smg_grpc_proto.generated import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

    rid = f"abort-me-{uuid.uuid4().hex}"
    with grpc.insecure_channel(srv.addr) as ch:
        stub = pb_grpc.VllmEngineStub(ch)
        call = stub.Generate(pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=[1, 2, 3]),
                                                sampling_params=pb.SamplingParams(
                                                    max_tokens=4, regex=expensive_regex(800, 99))), timeout=60)
        before = _metrics(srv)
        time.sleep(0.5)
        t0 = time.monotonic()
        stub.Abort(pb.AbortRequest(request_ids=[rid]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        took = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.CANCELLED, err.value
    assert "was aborted (an Abort call named it)" in err.value.details()
    assert took < 3, took
    after = _metrics(srv)
    assert sum(after[k] - before.get(k, 0) for k in after if k.startswith("abandoned")) == 1
