"""A column-parallel TP shard of an INT4 linear reads only its output rows' packed words, scales and zero points
(engine/rank/int4_linears._row_parts), in each checkpoint layout; rows off a packed word read the whole tensor and
keep their rows after dequantizing. (The tokens at -tp 2 -ep 2 with every projection INT4:
tests/ep/test_tp_quant_formats.py.)"""
from __future__ import annotations

import pytest
import torch

from moelink.engine.config.quantization_int4 import Int4Config
from moelink.engine.rank.int4_linears import int4_linear_plan
from moelink.moe.weight_plan import PlanEntry

PARTS = {"compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point"),
         "gptq": ("qweight", "scales", "qzeros"), "awq": ("qweight", "scales", "qzeros")}


def _plan(layout: str, symmetric: bool, rows: slice):
    quant = Int4Config(group_size=32, symmetric=symmetric, layout=layout)
    dest = torch.zeros(rows.stop - rows.start, 64)
    names = ["p." + part for part in PARTS[layout]]
    return int4_linear_plan({"p.weight": PlanEntry(dest, (), (rows,))}, names, quant)


@pytest.mark.parametrize("layout", ["compressed-tensors", "gptq", "awq"])
def test_a_column_shard_reads_its_rows_only(layout):
    q, s, z = ("p." + part for part in PARTS[layout])
    out = _plan(layout, symmetric=False, rows=slice(16, 32))
    if layout == "compressed-tensors":  # [N, K/8], [N, K/G], zeros [N/8, K/G]
        assert (out[q].source, out[s].source, out[z].source) == ((slice(16, 32),), (slice(16, 32),), (slice(2, 4),))
    else:  # GPTQ [K/8, N] / AWQ [K, N/8] qweight, [K/G, N] scales, [K/G, N/8] zeros
        words = slice(16, 32) if layout == "gptq" else slice(2, 4)
        assert out[q].source == (slice(None), words)
        assert (out[s].source, out[z].source) == ((slice(None), slice(16, 32)), (slice(None), slice(2, 4)))
    assert out[q].dest.target.rows == ()  # nothing left to cut after dequantizing


def test_rows_off_a_packed_word_read_whole_and_cut_after():
    out = _plan("awq", symmetric=True, rows=slice(4, 12))  # AWQ packs rows by 8: 4..12 splits two words
    assert out["p.qweight"].source == () and out["p.qweight"].dest.target.rows == (slice(4, 12),)
    sym = _plan("compressed-tensors", symmetric=True, rows=slice(4, 12))  # no zero points: rows are unpacked
    assert sym["p.weight_packed"].source == (slice(4, 12),)
