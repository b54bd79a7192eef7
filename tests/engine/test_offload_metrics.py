"""The KV offload tiers on /metrics (engine/core/metrics.py: `OffloadStatsSource`, `OffloadLoadObserved`): an engine
serving with host and disk tiers shows each tier's stored blocks, hits, bytes, evictions and load-time histogram
moving over HTTP as a prefix is evicted from the device and loaded back, and the numbers are the tiers' own."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moelink.engine import LLM, SamplingParams
from moelink.engine.core.metrics import EngineMetrics, OffloadLoadObserved, OffloadStatsSource, start_metrics_server
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector

from tests.helpers.parity import prompts

KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
BLOCK_BYTES = 2 * 4 * 2 * 16 * 8 * 2  # k and v, B=4, 2 kv heads x 16, float64, x 2 layers (qwen3_e6k3)


def _scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _tier(m: dict, name: str, tier: str) -> float:
    return m.get((name, (("tier", tier),)), 0.0)


def test_served_engine_shows_each_offload_tier_moving(tiny_model, tmp_path):
    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=31, n=4, lo=40, hi=41)  # 40 tokens: 10 blocks, half the device pool
    # A host tier of 12 blocks: the target's blocks are pushed down to disk as the others arrive.
    kvc = OffloadKVConnector(OffloadConfig(host_bytes=12 * BLOCK_BYTES, disk_bytes=1 << 30,
                                           disk_dir=str(tmp_path / "kv")))
    assert isinstance(kvc, OffloadStatsSource) and isinstance(kvc, OffloadLoadObserved)
    with LLM(path, kv_connector=kvc, **KW) as llm:
        metrics = EngineMetrics()
        metrics.attach(llm.engine)
        httpd = start_metrics_server(metrics.registry, "127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{httpd.server_port}/metrics"
            for p in [target, *others]:  # one at a time: each evicts the one before from the device
                llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)
            before = _scrape(url)
            out = llm.generate([{"prompt_token_ids": target}], GREEDY, use_tqdm=False)[0]
            after = _scrape(url)
        finally:
            httpd.close()
    assert out.num_cached_tokens == 39  # loaded back, not recomputed
    stats = kvc.offload_tier_stats()
    host, disk = stats["host"], stats["disk"]
    # Before the reload: the evicted blocks stored and pushed down, nothing found yet.
    assert _tier(before, "moelink_kv_offload_stored_blocks_total", "host") >= 10
    assert _tier(before, "moelink_kv_offload_block_evictions_total", "host") > 0
    assert _tier(before, "moelink_kv_offload_stored_blocks_total", "disk") > 0
    assert _tier(before, "moelink_kv_offload_block_hits_total", "disk") == 0
    # After: the target's 10 blocks found below the device, the counters the tiers' own.
    for t, st in (("host", host), ("disk", disk)):
        assert _tier(after, "moelink_kv_offload_block_hits_total", t) == st.hits
        assert _tier(after, "moelink_kv_offload_load_bytes_total", t) == st.loaded_bytes
        assert _tier(after, "moelink_kv_offload_stored_blocks_total", t) == st.stored
        assert _tier(after, "moelink_kv_offload_block_evictions_total", t) == st.evicted
        assert _tier(after, "moelink_kv_offload_load_time_seconds_total", t) == pytest.approx(st.load_s)
        assert _tier(after, "moelink_kv_offload_store_bytes_total", t) == st.stored_bytes
        assert _tier(after, "moelink_kv_offload_held_bytes", t) == st.held_bytes
        assert _tier(after, "moelink_kv_offload_failed_blocks_total", t) == st.failed == 0  # no copy failed
    assert host.hits + disk.hits == 10 and disk.hits > 0
    assert _tier(after, "moelink_kv_offload_load_bytes_total", "disk") > 0
    # The histogram: observed as each load from a tier is reported (the connector's `observe_offload_loads`).
    assert _tier(before, "moelink_kv_offload_load_seconds_count", "disk") == 0
    assert _tier(after, "moelink_kv_offload_load_seconds_count", "disk") >= 1
    for t in ("host", "disk"):  # the histogram's seconds are the counter's
        assert _tier(after, "moelink_kv_offload_load_seconds_sum", t) == pytest.approx(
            _tier(after, "moelink_kv_offload_load_time_seconds_total", t))
    assert _tier(after, "moelink_kv_offload_load_seconds_sum", "disk") > 0
    # The device prefix cache's own series beside them (its hits: the reloaded blocks join it).
    assert after[("moelink_prefix_cache_queries_total", ())] > before[("moelink_prefix_cache_queries_total", ())]


def test_offload_series_read_optional_fields_and_stay_off_without_tiers():
    from types import SimpleNamespace

    from moelink.engine.core.metrics import offload_families

    host = SimpleNamespace(stored=3, hits=2, loaded_bytes=64, load_s=0.5, evicted=1, stored_bytes=96, held_bytes=32)
    disk = SimpleNamespace(stored=1, hits=0, loaded_bytes=0, load_s=0.0, evicted=0)
    fams = {f.name: f for f in offload_families({"disk": disk, "host": host})}
    assert [s.labels["tier"] for s in fams["moelink_kv_offload_block_hits"].samples] == ["host", "disk"]
    assert [(s.labels["tier"], s.value) for s in fams["moelink_kv_offload_store_bytes"].samples] == [("host", 96)]
    assert [(s.labels["tier"], s.value) for s in fams["moelink_kv_offload_held_bytes"].samples] == [("host", 32)]
    assert not any(offload_families({}))
