"""benchmarks/rl_weight_sync.py at a tiny size: the bare broadcast row and one engine row, bytes by hand, the JSON."""
from __future__ import annotations

import json

import pytest

from moelink.benchmarks.rl_weight_sync import main


@pytest.mark.slow  # an engine and a gloo group: about 3 s
def test_rl_weight_sync_smoke_writes_rows(tmp_path, capsys):
    out = tmp_path / "sync.json"
    assert main(["--hidden", "64", "--experts", "4", "--layers", "2", "--moe-intermediate", "32", "--ep", "1",
                 "--bucket-mib", "1", "--repeats", "1", "--sleep", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    sleep = rows.pop()
    assert sleep["what"] == "sleep1" and sleep["bytes_freed"] > rows[0]["bytes"]  # the weights and the KV cache
    assert [(r["what"], r["ep"], r["bucket_mib"]) for r in rows] == [("bare", 1, None), ("engine", 1, 1)]
    assert rows[0]["bytes"] == rows[1]["bytes"] > 0 and all(r["s_per_gb"] > 0 for r in rows)
    assert "s/GB" in capsys.readouterr().out
