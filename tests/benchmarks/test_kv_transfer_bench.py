"""benchmarks/kv_transfer.py at a tiny size: every transport's row, the bytes by hand, the JSON the planner reads."""
from __future__ import annotations

import pytest

import json

from moelink.benchmarks.kv_transfer import main
from moelink.planner.kv_handoff import measured_transport_gbps


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_kv_transfer_smoke_writes_rows_the_planner_reads(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert main(["--shape", "deepseek-v3", "--tokens", "40", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["transport"] for r in rows} == {"tcp", "shm", "collective", "nixl"}
    assert all(r["bytes"] == 61 * 3 * 16 * 576 * 2 and r["transport_gbps"] > 0 for r in rows)  # 3 blocks of 16
    gbps, source = measured_transport_gbps(out)
    assert gbps == next(r["transport_gbps"] for r in rows if r["transport"] == "tcp") and "kv.json" in source
    assert "ratio" in capsys.readouterr().out
