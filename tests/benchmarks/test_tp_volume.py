"""benchmarks/tp_volume.py end to end: a rank's non-expert weight bytes fall with TP (replicated norms and router
aside), the experts' do not (EP places them), and the collective volume is what the layer count gives."""
from __future__ import annotations

from moelink.benchmarks import tp_volume


def test_tp_volume(tmp_path):
    rows = {r["tp"]: r for r in tp_volume.main(["--out", str(tmp_path / "tp.json")])["rows"]}
    w = {tp: rows[tp]["weight_bytes_per_rank"] for tp in (1, 2, 4)}
    for tp in (2, 4):
        assert w[tp]["experts"] == w[1]["experts"]
        # 1/tp of the split tensors, plus the replicated norms and router gates (under 1 % of the rest here)
        assert w[1]["non_expert"] / tp <= w[tp]["non_expert"] < w[1]["non_expert"] / tp * 1.02
    # Batch 1 at TP 2: embedding + 4 attention + 1 dense all-reduce of one [1, 256] bf16 row each.
    assert rows[2]["decode_step_batch1"]["all_reduce"] == 6 * 256 * 2
    assert rows[1]["decode_step_batch1"] == {"all_reduce": 0, "all_gather": 0, "broadcast": 0}
