"""benchmarks/kv_offload_ttft.py at a tiny size: the three TTFT rows and what each prompt found cached."""
from __future__ import annotations

import json

from moelink.benchmarks.kv_offload_ttft import main


def test_kv_offload_ttft_smoke_loads_from_host_where_the_device_evicted(tmp_path, capsys):
    out = tmp_path / "ttft.json"
    assert main(["--tokens", "64", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["ttft_s"]) == {"recompute", "host", "disk", "device"} and all(v > 0 for v in res["ttft_s"].values())
    # recompute: evicted, nothing cached; host: 4 blocks of 16 loaded back, the last token computed; device: a hit
    # of the 3 blocks before the last (a prefix hit stops short of the last prompt token's block)
    assert res["num_cached_tokens"] == {"recompute": 0, "host": 63, "disk": 63, "device": 48}
    assert res["tiers"]["host"]["host"]["hits"] == 4 and res["tiers"]["host"]["host"]["loaded_bytes"] > 0
    assert "device hit" in capsys.readouterr().out
