"""Prometheus /metrics after a small workload, the ExpertLoad RPC, `moelink stats` and the heat map."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.grpc_server import child_env, make_stubs, pool_is_free
from tests.helpers.tiny_configs import TINY_CONFIGS
from tests.helpers.waits import join_threads, wait_until
from tests.helpers import zygote


def _metrics_port(srv, timeout=30.0) -> int:
    line = srv.wait_for_line(r"moelink: metrics on http://", timeout, "the server's metrics address").string
    return int(line.rsplit(":", 1)[1].split("/", 1)[0])


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            values[key] = s.value
    return values


def test_metrics_move_with_the_workload(spawn_server, tmp_path, model_path):
    srv = spawn_server("--metrics-port", "0", "--log-format", "json")
    port = _metrics_port(srv)
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb

    stubs = make_stubs(grpc.insecure_channel(srv.addr))
    rng = random.Random(5)
    n_req, max_tokens = 7, 5
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(n_req)]
    for i, ids in enumerate(prompts):
        req = pb.GenerateRequest(request_id=f"m{i}", prompt_token_ids=pb.TokenIds(ids=ids),
                                 sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        last = list(stubs.native.Generate(req, timeout=60))[-1]
        assert last.finish_reason == "length"
    wait_until(lambda: pool_is_free(stubs.native, pb), 10, "the pool to be free")
    m = _scrape(port)
    assert sum(v for k, v in m.items() if k.startswith("moelink_requests_total{")) == n_req
    assert m["moelink_requests_total{outcome=length}"] == n_req
    assert m["moelink_generation_tokens_total"] == n_req * max_tokens
    assert m["moelink_prompt_tokens_total"] == sum(map(len, prompts))
    assert m["moelink_time_to_first_token_seconds_count"] == n_req
    assert m["moelink_e2e_request_latency_seconds_count"] == n_req
    assert m["moelink_inter_token_latency_seconds_count"] == n_req * (max_tokens - 1)
    assert m["moelink_kv_cache_usage_ratio"] == 0.0
    assert m["moelink_kv_cache_free_blocks"] == m["moelink_kv_cache_total_blocks"] > 0
    assert m["moelink_num_requests_running"] == 0 and m["moelink_num_requests_waiting"] == 0
    # Every computed token is routed to top-k experts in every MoE layer.
    cfg = TINY_CONFIGS["qwen3_e6k3"]
    computed = sum(len(p) + max_tokens - 1 for p in prompts) - m["moelink_prefix_cache_hits_total"]
    assert m["moelink_expert_tokens_total"] == computed * cfg["top_k"] * cfg["num_layers"]
    for layer in range(cfg["num_layers"]):
        assert m[f"moelink_expert_load_max_over_mean{{layer={layer}}}"] >= 1.0
    # The raw counts behind it, through the RPC and `moelink stats`.
    out = tmp_path / "load.json"
    proc = zygote.run([sys.executable, "-m", "moelink.engine.api.cli", "stats", "--target", srv.addr, "--out", str(out)],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    load = json.loads(out.read_text())
    assert sum(map(sum, load["tokens_per_expert"])) == m["moelink_expert_tokens_total"]
    assert len(load["tokens_per_expert"]) == cfg["num_layers"] and len(load["tokens_per_expert"][0]) == cfg["num_experts"]
    from moelink.benchmarks.plot_expert_load import plot

    heat, ranks = plot(load, str(tmp_path / "load"))
    assert heat.stat().st_size > 1000 and ranks.stat().st_size > 1000
    # Structured logs: one JSON line per finished request, with its id.
    srv.stop()
    finished = [json.loads(line) for line in srv.logs().splitlines()
                if line.startswith("{") and '"request finished"' in line]
    assert {rec["request_id"] for rec in finished} >= {f"m{i}" for i in range(n_req)}
    assert all(rec["finish_reason"] == "length" for rec in finished if rec["request_id"].startswith("m"))


def test_metrics_flags_validated(model_path):
    from moelink.engine.server.config import ServerConfig

    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(port=50051, metrics_port=50051)
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(metrics_port=70000)
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="xml")


def _connection_threads() -> list:
    """Threads serving one HTTP connection each (socketserver's ThreadingMixIn names them after its method)."""
    import threading

    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_half_open_connections_are_bounded_and_time_out(thread_server, monkeypatch):
    """200 clients that connect and never finish a request: a capped number of threads, each gone after the timeout."""
    import socket

    from moelink.engine.core import metrics

    monkeypatch.setattr(metrics, "METRICS_CONNECTION_TIMEOUT_S", 1.0)
    srv = thread_server(metrics_port=0)
    port = srv.server.metrics_port
    base = _connection_threads()
    socks = []
    try:
        most = 0
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metr")  # half a request line, then silence
            socks.append(s)
            # The bound holds at every point while the clients pile up (no wait on timing: threads of early
            # clients may already have timed out, so the count need not ever reach the cap).
            most = max(most, len(_connection_threads()) - len(base))
            assert most <= metrics.METRICS_MAX_CONNECTIONS, most
        # Every connection is closed by the server within the timeout (plus the accept loop's half-second tick).
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(max(0.1, 6.0 - (time.monotonic() - t0)))
            try:
                data = s.recv(1024)
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.startswith(b"HTTP/1.")  # closed (refused) or an error answer, never a hang
        assert time.monotonic() - t0 < 6.0
    finally:
        for s in socks:
            s.close()
    join_threads([t for t in _connection_threads() if t not in base], 5, "the metrics server's connection threads to end")
    assert len(_connection_threads()) == len(base)
    # A client that trickles one byte at a time is cut off too, and a normal scrape still works.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - t0 < 10:
                s.sendall(b"G")
                time.sleep(0.2)
        assert time.monotonic() - t0 < 4
    assert "moelink_num_requests_running" in _scrape(port)


def test_stopping_the_metrics_server_does_not_block_the_event_loop(thread_server):
    """Closing the metrics server waits for its accept loop (up to 0.5 s): stop() used to do it on the loop."""
    import threading

    srv = thread_server(metrics_port=0)
    metrics_server = srv.server._metrics_server
    real_close, closed_on = metrics_server.close, []

    def close():
        closed_on.append(threading.current_thread().name)
        real_close()

    metrics_server.close = close
    srv.call(srv.server.stop(0.5))
    assert closed_on and closed_on[0] != srv.thread.name, closed_on


def test_idle_connections_do_not_block_scrapes(thread_server):
    """Issue 32, item 9: 40 connections that never send a byte filled the 16 connection threads, and every
    scrape was refused (0 of 14). Now they hold no thread: every scrape is answered, promptly."""
    import socket

    from moelink.engine.core import metrics

    srv = thread_server(metrics_port=0)
    port = srv.server.metrics_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.3)  # all accepted
        answered, slowest = 0, 0.0
        for _ in range(14):
            t0 = time.monotonic()
            try:
                if "moelink_num_requests_running" in _scrape(port):
                    answered += 1
            except OSError:
                pass
            slowest = max(slowest, time.monotonic() - t0)
        print(f"\nscrapes answered next to 40 idle connections: {answered} of 14, slowest {slowest * 1000:.0f} ms")
        assert answered == 14 and slowest < 2.0, (answered, slowest)
        assert metrics.METRICS_MAX_CONNECTIONS < 40  # the idle ones would have filled every slot
    finally:
        for s in idle:
            s.close()
