"""`GET /metrics` on the OpenAI HTTP port (issue 48): Prometheus text with moelink's series, vLLM's names beside
them, and the managed smg gateway's own; the start-up line says --port is gRPC. One `moelink serve --http-port`
(no --metrics-port: the HTTP port alone serves them), real HTTP GETs; the server is the one test_http_front.py sends
its requests to (tests/server/conftest.py's `openai_server`), so the counts are read before and after this test's
request."""
from __future__ import annotations

import http.client
import re

import pytest

SERVED = "tiny-moe"


pytestmark = pytest.mark.xdist_group("openai_server")  # one worker starts `openai_server` (tests/server/conftest.py)


def _get(port: int, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"{series} not in /metrics"
    return float(m.group(1))


@pytest.mark.slow
def test_metrics_on_the_http_port_with_vllm_names_and_smgs(openai_server):
    srv, port = openai_server
    line = next(x for x in srv.stdout_lines if x.startswith("moelink: serving"))
    assert f"(gRPC plaintext, --port; the OpenAI API (vLLM's --port) is --http-port {port};" in line
    label = f'{{engine="0",model_name="{SERVED}"}}'  # vLLM's labels, in prometheus_client's (sorted) order
    counted = [f"vllm:generation_tokens_total{label}", "moelink_generation_tokens_total", "moelink_prompt_tokens_total",
               f"vllm:prompt_tokens_total{label}", f"vllm:e2e_request_latency_seconds_count{label}",
               f"vllm:time_to_first_token_seconds_count{label}",
               f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{SERVED}"}}',
               f"vllm:request_params_n_count{label}"]

    def values(text: str) -> dict[str, float]:  # a series not yet exported (no request yet) counts 0
        return {s: _value(text, s) if re.search(rf"^{re.escape(s)} ", text, re.M) else 0.0 for s in counted}

    before = values(_get(port, "/metrics")[2].decode())
    status, _, body = _get(port, "/v1/completions", b'{"model": "tiny-moe", "prompt": "Hello there", '
                                                    b'"max_tokens": 5, "temperature": 0, "ignore_eos": true}')
    assert status == 200, body
    status, headers, body = _get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for s in counted:
        _value(text, s)  # each is exported once a request has finished
    new = {s: v - before[s] for s, v in values(text).items()}
    # vLLM's names are moelink's numbers: the one request's 5 tokens, its prompt, its latency histograms.
    assert new[f"vllm:generation_tokens_total{label}"] == new["moelink_generation_tokens_total"] == 5
    prompt = new["moelink_prompt_tokens_total"]
    assert prompt > 0 and new[f"vllm:prompt_tokens_total{label}"] == prompt
    assert new[f"vllm:e2e_request_latency_seconds_count{label}"] == 1
    assert new[f"vllm:time_to_first_token_seconds_count{label}"] == 1
    assert new[f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{SERVED}"}}'] == 1
    assert new[f"vllm:request_params_n_count{label}"] == 1  # the server's request loop reports n once
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert _value(text, gauge + label) >= 0
    assert _value(text, "moelink_http_gateway_up") == 1
    assert re.search(r"^smg_\w+", text, re.M), "smg's own metrics are missing"  # merged from its loopback port
    # Only GET /metrics is answered there; the rest of the control plane stays closed.
    assert _get(port, "/metrics/x")[0] == 404
