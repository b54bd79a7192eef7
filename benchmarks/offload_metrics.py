"""The KV offload tiers' counters and the device prefix cache's, read from a server's Prometheus endpoint for
`moelink bench-serve`: what one load level did to each tier (blocks stored, found and loaded back, their bytes and
seconds, evictions), as the difference of two scrapes (engine/core/metrics.py names the series)."""
from __future__ import annotations

import urllib.request
from typing import Optional

# moelink's sample name -> the key a level's report uses (per tier)
TIER_SERIES = {"moelink_kv_offload_stored_blocks_total": "stored_blocks",
               "moelink_kv_offload_store_bytes_total": "store_bytes",
               "moelink_kv_offload_block_hits_total": "hits",
               "moelink_kv_offload_load_bytes_total": "load_bytes",
               "moelink_kv_offload_load_time_seconds_total": "load_s",
               "moelink_kv_offload_block_evictions_total": "evictions"}
DEVICE_SERIES = {"moelink_prefix_cache_queries_total": "queries", "moelink_prefix_cache_hits_total": "hits"}


def scrape_offload(url: str, timeout_s: float = 5.0) -> Optional[dict]:
    """{"device": {"queries", "hits"} (prompt tokens), "tiers": {tier: {key: value}}} at `url` (a /metrics
    endpoint), or None when the server has no offload tiers."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (a URL the user gave, http only)
        text = resp.read().decode()
    device, tiers = {}, {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in DEVICE_SERIES:
                device[DEVICE_SERIES[s.name]] = s.value
            elif s.name in TIER_SERIES:
                tiers.setdefault(s.labels["tier"], {})[TIER_SERIES[s.name]] = s.value
    return dict(device=device, tiers=tiers) if tiers else None


def offload_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """What one level did (after - before): per tier its counters, with the mean seconds per block loaded, and the
    device prefix cache's hit rate over the level's looked-up prompt tokens; None without offload tiers."""
    if after is None:
        return None
    b = before or dict(device={}, tiers={})
    tiers = {}
    for tier, vals in after["tiers"].items():
        d = {k: v - b["tiers"].get(tier, {}).get(k, 0.0) for k, v in vals.items()}
        d["load_ms_per_block"] = 1e3 * d["load_s"] / d["hits"] if d.get("hits") else None
        tiers[tier] = d
    queries = after["device"].get("queries", 0.0) - b["device"].get("queries", 0.0)
    hits = after["device"].get("hits", 0.0) - b["device"].get("hits", 0.0)
    return dict(device_prefix_hit_rate=hits / queries if queries else 0.0, device_prefix_hit_tokens=hits,
                tiers=tiers)


def offload_text(lv: dict) -> str:
    """A level's offload line for bench-serve's console ('' without tiers)."""
    o = lv.get("offload")
    if not o:
        return ""
    parts = [f"device prefix hits {o['device_prefix_hit_rate']:.0%}"]
    for tier, d in o["tiers"].items():
        parts.append(f"{tier}: {d.get('hits', 0):.0f} blocks loaded ({d.get('load_bytes', 0) / 2**20:.1f} MiB), "
                     f"{d.get('stored_blocks', 0):.0f} stored, {d.get('evictions', 0):.0f} evicted")
    return "  offload: " + "; ".join(parts)


__all__ = ["offload_delta", "offload_text", "scrape_offload"]
