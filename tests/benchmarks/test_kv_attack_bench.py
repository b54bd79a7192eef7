"""benchmarks/kv_attack.py (issue 53's round-5 attack, run again) at a small size: it runs, and what it reports is
what the fix promises (no cache byte readable or writable with or without the secret, nothing changed for a later
user, the flood held within its client's share)."""
from __future__ import annotations

import pytest

from moelink.engine.kv_transfer.nixl import nixl_available


@pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed")
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_attack_benchmark_reports_every_finding_closed():
    from moelink.benchmarks.kv_attack import main

    out = main(["--flood", "4", "--flood-len", "63", "--victims", "2", "--kv-blocks", "128"])
    (bounded,) = out["hold_exhaustion"]
    assert 0 < bounded["held_blocks_at_end"] <= int(128 * 0.0625) and bounded["holds_released_unread"] > 0
    without, with_secret = out["reads_and_writes"]
    assert not without["reply_has_nixl_metadata"] and with_secret["reply_has_nixl_metadata"]
    for r in (without, with_secret):
        assert r["cache_bytes_readable"] == r["cache_bytes_writable"] == r["cache_bytes_readable_stale"] == 0
        assert not r["cache_changed"] and r["later_user_tokens_equal"] and r["later_user_max_logprob_diff"] == 0.0
