"""benchmarks/compressed_attention_decode.py end to end at tiny shapes (--cpu-smoke), and its counted bytes worked by hand."""
from __future__ import annotations

from moelink.benchmarks.compressed_attention_decode import SHAPES, bytes_read, main


def test_bytes_read_at_v4_flash_shapes():
    b = bytes_read(131072, 1, SHAPES)
    assert b["full"] == 131072 * 512 * 2
    assert b["csa"] == ((128 + 512) * 512 + 32768 * 128) * 2  # window + top-512 entries, every index key
    assert b["hca"] == (128 + 1024) * 512 * 2  # window + every entry
    assert b["mla"] == 131072 * 576 * 2


def test_cpu_smoke_runs(tmp_path):
    rep = main(["--cpu-smoke", "--json", str(tmp_path / "out.json")])
    assert [p["ctx"] for p in rep["points"]] == [64, 256]
    assert all(p["csa_s"] > 0 and p["hca_s"] > 0 and p["full_s"] > 0 for p in rep["points"])
    assert (tmp_path / "out.json").is_file()
