"""A stream cut at shutdown never looks finished (issue 27, item 4), on every path a client can take.

Ctrl-C twice (SIGINT, SIGINT) ends what is still running at once with finish_reason "abort". The native
gRPC stream says so in its last message. smg (1.13) turns a streamed completion's unknown finish_reason into
"stop" and ends with `data: [DONE]`, so the VllmEngine stream of a request cut by the shutdown ends with
UNAVAILABLE instead, which smg passes to the HTTP client as an error event.
"""
from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import grpc
import pytest

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess, make_stubs
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable

SERVED = "tiny-moe"
LONG = 1000  # tokens: far more than the tiny model writes before the second Ctrl-C


def _http_stream(port: int, path: str, body: dict, started: threading.Event, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:"):
                out.append(line[5:].strip())
                started.set()
    except Exception as e:  # recorded: the assertions say what was expected
        out.append(e)
    finally:
        conn.close()
        started.set()


def _grpc_stream(call, started: threading.Event, out: list) -> None:
    try:
        for msg in call:
            out.append(msg)
            started.set()
    except grpc.RpcError as e:
        out.append(e)
    finally:
        started.set()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_second_ctrl_c_ends_every_stream_as_aborted_or_failed(model_path):
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    port = free_port()
    flags = ENGINE_FLAGS[:2] + ["--max-model-len", "1024", "--num-kv-blocks", "4096", "--served-model-name", SERVED,
                                "--http-port", str(port), "--shutdown-grace", "60"]
    srv = ServerProcess(model_path, flags)
    try:
        srv.wait_for_line(r".*OpenAI API on http://127\.0\.0\.1:(\d+)/v1", 60, "the OpenAI API line")
        ch = grpc.insecure_channel(srv.addr)
        s = make_stubs(ch)
        pb, vpb = s.pb, s.vpb
        native_req = pb.GenerateRequest(request_id="native", prompt="a long story",
                                        sampling_params=pb.SamplingParams(max_tokens=LONG, ignore_eos=True))
        vllm_req = vpb.GenerateRequest(request_id="vllm", tokenized=vpb.TokenizedInput(input_ids=[1, 2, 3, 4]),
                                       stream=True, sampling_params=vpb.SamplingParams(max_tokens=LONG, ignore_eos=True))
        calls = {"native": s.native.Generate(native_req, timeout=90), "vllm": s.vllm.Generate(vllm_req, timeout=90)}
        body = dict(model=SERVED, stream=True, max_tokens=LONG, ignore_eos=True, temperature=0)
        http_paths = {"http completions": ("/v1/completions", dict(body, prompt="a long story")),
                      "http chat": ("/v1/chat/completions", dict(body, messages=[{"role": "user", "content": "hi"}]))}
        results = {name: [] for name in [*calls, *http_paths]}
        started = {name: threading.Event() for name in results}
        threads = [threading.Thread(target=_grpc_stream, args=(call, started[n], results[n]))
                   for n, call in calls.items()]
        threads += [threading.Thread(target=_http_stream, args=(port, path, b, started[n], results[n]))
                    for n, (path, b) in http_paths.items()]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values()), {n: r[-1:] for n, r in results.items()}
        srv.signal(signal.SIGINT)
        time.sleep(0.3)
        srv.signal(signal.SIGINT)
        for t in threads:
            t.join(60)
        assert srv.wait(60) == 0, srv.logs()[-3000:]
        ch.close()
    finally:
        srv.stop()
        srv.close()

    native = results["native"]
    assert native[-1].finish_reason == "abort" and native[-1].usage.completion_tokens < LONG, native[-1]
    vllm = results["vllm"]
    assert isinstance(vllm[-1], grpc.RpcError) and vllm[-1].code() == grpc.StatusCode.UNAVAILABLE, vllm[-1]
    assert "cut short" in vllm[-1].details() and "shutting down" in vllm[-1].details()
    assert not any(m.HasField("complete") for m in vllm[:-1])
    for name in http_paths:
        events = [e for e in results[name] if isinstance(e, str) and e != "[DONE]"]
        parsed = [json.loads(e) for e in events]
        finishes = [c.get("finish_reason") for p in parsed for c in p.get("choices", []) if c.get("finish_reason")]
        assert finishes in ([], ["abort"]), (name, finishes)  # never "stop" or "length": the answer is cut
        assert finishes == ["abort"] or "shutting down" in parsed[-1].get("error", {}).get("message", ""), \
            (name, events[-2:])
