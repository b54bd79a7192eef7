"""`moelink plan --precision mxfp4`: DeepSeek-V4 as published (MXFP4 routed experts, an e8m0 scale per 32 values:
0.53125 byte a weight, run W4A16; the shared expert and attention projections FP8 block-scaled), and the memory
answer it gives for V4-Pro on one 8-GPU node: 8x B200, not 8x H200 (~131 GB of weights per rank)."""
from __future__ import annotations

from moelink.planner.hardware import get_profile
from moelink.planner.models import get_model
from moelink.planner.plan import PRECISIONS, PlanInputs, fits
from moelink.planner.step_model import Setup, weights_per_rank_bytes
from moelink.planner.weight_bytes import bytes_per_weight


def test_mxfp4_bytes_and_the_published_v4_precision():
    assert bytes_per_weight("mxfp4") == 0.5 + 1 / 32
    p = PRECISIONS["mxfp4"]
    assert (p.experts, p.shared, p.dense, p.dispatch) == ("mxfp4", "fp8", "fp8", "bf16")
    flash = get_model("deepseek-v4-flash")
    w = {k: weights_per_rank_bytes(flash, Setup(ep=8, precision=PRECISIONS[k])) for k in ("mxfp4", "fp8", "bf16")}
    assert w["mxfp4"] < 0.65 * w["fp8"] < 0.35 * w["bf16"]


def test_v4_pro_as_published_fits_8x_b200_not_8x_h200():
    pro = get_model("deepseek-v4-pro")
    assert 120e9 < weights_per_rank_bytes(pro, Setup(ep=8, precision=PRECISIONS["mxfp4"])) < 140e9
    assert fits(PlanInputs(pro, get_profile("b200-hgx"), ep=8, batch_per_rank=8, precision="mxfp4"), 8, 8)
    assert not fits(PlanInputs(pro, get_profile("h200-hgx"), ep=8, batch_per_rank=1, precision="mxfp4"), 8, 1)
    assert not fits(PlanInputs(pro, get_profile("b200-hgx"), ep=8, batch_per_rank=1, precision="fp8"), 8, 1)
