"""`moelink bench-serve --prefix-reuse` against a server with KV offload tiers (benchmarks/serve_load.py,
benchmarks/offload_metrics.py): shared prefixes reach the server's prefix cache and host tier, and each level's
report carries the tiers' counters scraped from /metrics beside its TTFT (a CPU smoke)."""
from __future__ import annotations

import json

import pytest

from moelink.benchmarks import serve_load
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector

from tests.helpers.grpc_server import ThreadServer


def test_bench_serve_shared_prefixes_report_the_offload_tiers(tiny_model, tmp_path, capsys):
    # 24 blocks of 4 tokens: two running prompts of 28 tokens leave room for little else, so the 6 shared
    # prefixes of 16 tokens are evicted from the device and found in host memory.
    srv = ThreadServer(tiny_model("qwen3_e6k3"), dict(dtype="float32", num_kv_blocks=24, block_size=4,
                                                      max_model_len=64, skip_warmup=True, kv_connector=OffloadKVConnector(OffloadConfig(host_bytes=1 << 26))),
                       metrics_port=0)
    out = tmp_path / "bench.json"
    try:
        assert serve_load.main(["--target", srv.addr, "--metrics-url", f"http://127.0.0.1:{srv.server.metrics_port}/metrics",
                                "--concurrency", "2", "--rates", "", "--num-requests", "24", "--input-len", "24",
                                "--output-len", "2", "--prefix-reuse", "1", "--prefix-len", "16", "--num-prefixes", "6",
                                "--out", str(out), "--no-plot"]) == 0
    finally:
        srv.close()
    (lv,) = json.loads(out.read_text())["levels"]
    assert lv["completed"] == 24 and lv["ttft_ms"]["p50"] > 0
    host = lv["offload"]["tiers"]["host"]
    assert host["stored_blocks"] > 0 and host["hits"] > 0 and host["load_bytes"] > 0
    assert host["load_ms_per_block"] > 0 and lv["offload"]["device_prefix_hit_rate"] > 0
    printed = capsys.readouterr().out
    assert "device prefix hits" in printed and "| host: blocks loaded, MiB, ms/block, stored, evicted |" in printed


@pytest.mark.parametrize("args,flag", [(["--prefix-reuse", "1.5"], "--prefix-reuse=1.5"),
                                       (["--prefix-reuse", "0.5", "--prefix-len", "32"], "--prefix-len=32")])
def test_bad_prefix_flags_are_named(args, flag):
    with pytest.raises(ValueError, match=flag):
        serve_load.main(["--target", "127.0.0.1:1", "--input-len", "32", "--no-plot", *args])
