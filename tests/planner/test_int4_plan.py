"""`moelink plan --precision int4` (issue 44): INT4 W4A16 routed experts counted as the engine holds them (half a byte
a weight + a bf16 scale per 32: 0.5625 byte, 0.28x bf16), the rest bf16 as Kimi K2 Thinking / K2.5 publish it, and
the memory answer for Kimi K2.5 on one 8-GPU node: it fits 8x H200, not 8x H100."""
from __future__ import annotations

from moelink.planner.hardware import get_profile
from moelink.planner.models import get_model
from moelink.planner.plan import PRECISIONS, PlanInputs, fits
from moelink.planner.step_model import Setup, weights_per_rank_bytes
from moelink.planner.weight_bytes import bytes_per_weight, weight_bytes


def test_int4_bytes_per_weight():
    assert bytes_per_weight("int4") == 0.5 + 2 / 32
    assert abs(bytes_per_weight("int4") / bytes_per_weight("bf16") - 0.28125) < 1e-12
    assert weight_bytes("int4", 2048, 7168) == 2048 * 7168 // 2 + 2048 * 224 * 2
    assert weight_bytes("int4", 768, 2048, group=128, zero_points=True) == 768 * 1024 + 768 * 16 * 3


def test_kimi_k25_fits_8x_h200_not_8x_h100():
    model = get_model("kimi-k2.5")
    w = weights_per_rank_bytes(model, Setup(ep=8, precision=PRECISIONS["int4"]))
    bf16 = weights_per_rank_bytes(model, Setup(ep=8, precision=PRECISIONS["bf16"]))
    assert 85e9 < w < 105e9 and w < 0.35 * bf16  # ~595 GB of INT4 experts + bf16 attention / shared / embeddings
    h200 = PlanInputs(model, get_profile("h200-hgx"), ep=8, batch_per_rank=32, precision="int4")
    h100 = PlanInputs(model, get_profile("h100-hgx"), ep=8, batch_per_rank=1, precision="int4")
    assert fits(h200, 8, 32) and not fits(h100, 8, 1)
    assert fits(PlanInputs(model, get_profile("h100-hgx"), ep=16, batch_per_rank=1, precision="int4"), 16, 1)
