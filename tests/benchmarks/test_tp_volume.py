"""benchmarks/tp_volume.py end to end: a rank's weight bytes fall with TP (replicated norms and router aside), the
experts' too (split by intermediate size), and the collective volume is what the layer count gives."""
from __future__ import annotations

from moelink.benchmarks import tp_volume


def test_tp_volume(tmp_path):
    rows = {r["tp"]: r for r in tp_volume.main(["--out", str(tmp_path / "tp.json")])["rows"]}
    w = {tp: rows[tp]["weight_bytes_per_rank"] for tp in (1, 2, 4)}
    for tp in (2, 4):
        assert w[tp]["experts"] == w[1]["experts"] // tp
        # 1/tp of the split tensors, plus the replicated norms and router gates (under 1 % of the rest here)
        assert w[1]["non_expert"] / tp <= w[tp]["non_expert"] < w[1]["non_expert"] / tp * 1.02
    vol = {tp: rows[tp]["collective_bytes_per_rank"] for tp in (1, 2)}
    # Batch 1 at TP 2: embedding + 4 attention + 1 dense all-reduce of one [1, 256] bf16 row each, and with the
    # experts split 3 more (one per MoE layer); with EP the MoE layers all-gather one padded row per rank instead.
    assert vol[2]["ep"]["decode_step_batch1"]["all_reduce"] == 6 * 256 * 2
    assert vol[2]["split"]["decode_step_batch1"]["all_reduce"] == 9 * 256 * 2
    assert vol[1]["split"]["decode_step_batch1"] == {"all_reduce": 0, "all_gather": 0, "broadcast": 0}
