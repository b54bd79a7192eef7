"""The KV offload tier in `moelink plan` (planner/offload_tier.py): which tier a reused prefix is found in, what
loading it from there costs against recomputing it, and the TTFT saved; worked by hand on round numbers, then on
a real plan."""
from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from moelink.planner.hardware import get_profile
from moelink.planner.models import get_model
from moelink.planner.offload_tier import (OffloadWorkload, add_offload_args, format_offload, offload_from_args,
                                          tier_plan)
from moelink.planner.plan import PlanInputs, plan, prefill_at
from moelink.planner.report import format_plan


def test_tiers_by_hand():
    # 1,000 bytes per token; 10 prefixes of 100 tokens: a working set of 1,000 tokens.
    # device 100 tokens -> found there 10 %; host 300 more (what the device evicted) -> 40 % found by then;
    # disk 500 more (what the host pushed out) -> 90 %; 10 % recomputed.
    w = OffloadWorkload(host_bytes=300_000, disk_bytes=500_000, prefix_reuse=0.5, distinct_prefixes=10, disk_gbps=5.0)
    o = tier_plan(w, prefix_tokens=100, kv_bytes_per_token=1000.0, device_bytes=100_000.0, host_link_gbps=50.0,
                  recompute_s=0.01)
    rows = {t["tier"]: t for t in o["tiers"]}
    assert [rows[t]["prefix_tokens_held"] for t in ("device", "host", "disk")] == [100, 300, 500]
    assert [rows[t]["hit_share"] for t in ("device", "host", "disk")] == pytest.approx([0.1, 0.3, 0.5])
    assert o["recomputed_share"] == pytest.approx(0.1)
    # 100 kB over a 50 GB/s host link: 2 us; from disk at 5 GB/s (slower than the link): 20 us.
    assert rows["host"]["load_ms"] == pytest.approx(0.002) and rows["disk"]["load_ms"] == pytest.approx(0.02)
    assert rows["device"]["ttft_saved_ms"] == pytest.approx(10.0)
    assert rows["host"]["ttft_saved_ms"] == pytest.approx(10.0 - 0.002)
    want = 0.1 * 10.0 + 0.3 * (10.0 - 0.002) + 0.5 * (10.0 - 0.02)
    assert o["mean_ttft_saved_ms"] == pytest.approx(want)
    assert o["offload_ttft_saved_ms"] == pytest.approx(want - 1.0)
    # A disk slower than recomputing saves nothing there (the request recomputes), and says so.
    slow = tier_plan(replace(w, disk_gbps=0.001), 100, 1000.0, 100_000.0, 50.0, 0.01)
    disk = slow["tiers"][2]
    assert disk["ttft_saved_ms"] == 0 and not disk["worth_loading"]
    assert "recomputing is faster" in "\n".join(format_offload({"kv_offload": slow}))
    # No reuse: the tiers' room is still shown, nobody is found there.
    none = tier_plan(replace(w, prefix_reuse=0.0), 0, 1000.0, 100_000.0, 50.0, 0.0)
    assert none["mean_ttft_saved_ms"] == 0 and none["recomputed_share"] == 1.0


def test_a_plan_prices_the_tiers_against_its_own_prefill():
    base = PlanInputs(get_model("deepseek-v3"), get_profile("h100-hgx"), ep=32, batch_per_rank=64, input_len=4000)
    assert plan(base)["kv_offload"] is None and "KV offload" not in format_plan(plan(base))
    w = OffloadWorkload(host_bytes=200 << 30, disk_bytes=2 << 40, prefix_reuse=0.75, distinct_prefixes=2000)
    res = plan(replace(base, offload=w))
    o = res["kv_offload"]
    assert o["prefix_tokens"] == 3000
    # Recomputing the prefix: its own prefill of 3,000 tokens on one rank, as the step model prices it.
    alone = replace(base, input_len=3000, prefill_chunk=3000)
    assert o["recompute_ms"] == pytest.approx(prefill_at(alone, 32)[0].seconds * 1e3)
    host = o["tiers"][1]
    # 3,000 tokens of MLA latent (576 bf16 values x 61 layers) over PCIe 5.0 at 50 GB/s.
    assert host["load_ms"] == pytest.approx(3000 * 576 * 2 * 61 / 50e9 * 1e3)
    assert host["prefix_tokens_held"] == pytest.approx((200 << 30) / (576 * 2 * 61))
    assert 0 < host["load_ms"] < o["recompute_ms"] and host["ttft_saved_ms"] > 0
    # Host and disk tiers find most of the 6M-token working set that HBM cannot hold.
    assert o["tiers"][0]["hit_share"] < 0.01 and o["recomputed_share"] == pytest.approx(0.0)
    text = format_plan(res)
    assert "KV offload: a reused prefix of 3,000 tokens" in text and "mean TTFT saved per request" in text
    assert o["prompt_tokens_cached_share"] == pytest.approx(0.75) and "--prefix-hit 0.75 prices it" in text
    # Without the tiers the same workload recomputes what HBM does not hold.
    bare = plan(replace(base, offload=replace(w, host_bytes=0, disk_bytes=0)))["kv_offload"]
    assert bare["recomputed_share"] > 0.99 and bare["offload_ttft_saved_ms"] == 0
    # The same question on Grace Blackwell: NVLink-C2C loads the prefix 9x faster than PCIe.
    gb = plan(replace(base, hardware=get_profile("gb200-nvl72"), offload=w))["kv_offload"]
    assert gb["tiers"][1]["load_ms"] == pytest.approx(host["load_ms"] * 50 / 450)


def test_flags_build_the_workload_and_name_a_bad_one():
    p = argparse.ArgumentParser()
    add_offload_args(p)
    ns = p.parse_args(["--kv-offload-host-bytes", str(64 << 30), "--prefix-reuse", "0.5", "--distinct-prefixes", "8"])
    assert offload_from_args(ns) == OffloadWorkload(host_bytes=64 << 30, prefix_reuse=0.5, distinct_prefixes=8)
    assert not offload_from_args(p.parse_args([])).on
    with pytest.raises(ValueError, match=r"--prefix-reuse: prefix_reuse=1.0 must be in \[0, 1\)"):
        offload_from_args(p.parse_args(["--prefix-reuse", "1"]))
    with pytest.raises(ValueError, match="--kv-offload-disk-bytes: disk_bytes=-1 must be an integer >= 0"):
        offload_from_args(p.parse_args(["--kv-offload-disk-bytes", "-1"]))
    with pytest.raises(ValueError, match="--kv-offload-disk-gbps"):
        offload_from_args(p.parse_args(["--kv-offload-disk-gbps", "0"]))
