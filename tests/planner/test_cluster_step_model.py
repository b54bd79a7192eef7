"""Step model, kernels roofline, imbalance and model shapes against hand-computed cases."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moelink.planner.efficiency import Efficiency
from moelink.planner.hardware import GpuSpec, get_profile
from moelink.planner.imbalance import Balance, counts_imbalance, expected_max_normal, \
    expert_load_imbalance, zipf_counts
from moelink.planner.kernels import WEIGHT_BYTES, gemm_time, grouped_expert_time, \
    load_moe_measurements
from moelink.planner.models import get_model
from moelink.planner.step_model import Precision, Setup, decode_step, max_batch_per_rank, \
    mixed_iteration, prefill_chunk

# A round-number GPU: 1000 TFLOP/s BF16, 2000 FP8, 1 TB/s; ceilings equal to the datasheet.
TOY = GpuSpec("toy", {"bf16": 1000, "fp8": 2000}, hbm_gb=80, hbm_tbps=1.0, matmul_fraction=1.0, copy_fraction=1.0)
IDEAL = Efficiency(gemm=1.0, attention=1.0, memory=1.0, layer_overhead_s=0.0, step_overhead_s=0.0,
                   activation_passes=0, tile_m=64)
DS = get_model("deepseek-v3")


def test_memory_bound_grouped_gemm_floor():
    # One token to each of 8 experts: every expert is active with probability 1 - e^-1, and the kernel
    # is bound by reading their weights (3*H*I bytes each in FP8) plus a few activation bytes.
    h, i = 7168, 2048
    t = grouped_expert_time(8, 8, h, i, TOY, "fp8", IDEAL)
    weights = 8 * (1 - math.exp(-1)) * 3 * h * i * WEIGHT_BYTES["fp8"]
    acts = 8 * (h * 1 + 2 * i * 2 + i * 1 + h * 2)
    assert t == pytest.approx((weights + acts) / 1e12)
    # The floor does not move until the padded rows make compute win: 64 rows cost the same as 1.
    assert grouped_expert_time(64 * 8, 8, h, i, TOY, "fp8", IDEAL) < 1.2 * t * (1 / (1 - math.exp(-1)))


def test_compute_bound_grouped_gemm_and_tile_padding():
    h, i = 4096, 1024
    fast = replace(TOY, hbm_tbps=100.0)  # so that the activation traffic cannot be the bound
    big = grouped_expert_time(8192 * 4, 4, h, i, fast, "bf16", IDEAL)
    assert big == pytest.approx(2 * 4 * 8192 * 3 * h * i / 1000e12)
    # 65 rows on one expert run as two 64-row tiles: the same FLOPs as 128 rows.
    assert grouped_expert_time(65, 1, h, i, fast, "bf16", replace(IDEAL, tile_m=64)) == pytest.approx(
        grouped_expert_time(128, 1, h, i, fast, "bf16", replace(IDEAL, tile_m=64)), rel=0.02)


def test_gemm_time_roofline():
    # 1 row against 1e9 FP8 weights: memory (1 GB at 1 TB/s = 1 ms); 1e5 rows: compute (2e14 / 2e15).
    assert gemm_time(1, 1e9, 0, TOY, "fp8", IDEAL) == pytest.approx(1e-3, rel=1e-3)
    assert gemm_time(1e5, 1e9, 0, TOY, "fp8", IDEAL) == pytest.approx(0.1)
    assert gemm_time(0, 1e9, 0, TOY, "fp8", IDEAL) == 0.0


def test_expected_max_normal_and_imbalance():
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-4)
    assert expected_max_normal(8) == pytest.approx(1.4236, rel=1e-3)
    assert expert_load_imbalance(Balance("perfect"), 64, 4, 100) == 1.0
    assert expert_load_imbalance(Balance("eplb"), 1, 4, 100) == 1.0
    # Uniform routing: Poisson noise only, 1 + z_R / sqrt(mu).
    assert expert_load_imbalance(Balance("uniform"), 8, 4, 400) == pytest.approx(1 + expected_max_normal(8) / 20)
    skew = expert_load_imbalance(Balance.parse(0.5), 8, 4, 1e9)
    assert skew == pytest.approx(1 + 0.25 * expected_max_normal(8), rel=1e-6)
    assert counts_imbalance([4, 0, 1, 1, 1, 1], 3) == pytest.approx(4 / (8 / 3))  # loads 4, 2, 2
    assert Balance("counts", counts=(4, 0, 1, 1, 1, 1)).kind == "counts"
    counts = zipf_counts(16, 1.0)
    assert sum(counts) == pytest.approx(1e6) and max(counts) / min(counts) == pytest.approx(16)
    with pytest.raises(ValueError, match="balance kind='skewed'"):
        Balance("skewed")


def test_model_shapes_match_published_sizes():
    sizes = {"deepseek-v3": 671e9, "kimi-k2": 1.03e12, "qwen3-235b-a22b": 235e9, "qwen3-30b-a3b": 30.5e9,
             "mixtral-8x22b": 141e9}
    for name, total in sizes.items():
        assert get_model(name).total_params() == pytest.approx(total, rel=0.02), name
    # MLA decode: 128 heads x (576 QK + 512 PV) x 2 FLOPs per query-key pair.
    assert DS.attn_flops_per_key(decode=True) == 2 * 128 * 576 + 2 * 128 * 512
    assert DS.kv_elems_per_token() == 576


def _setup(**kw) -> Setup:
    base = dict(ep=8, batch_per_rank=64, context_len=2048, overlap="none")
    base.update(kw)
    return Setup(**base)


def test_breakdown_sums_to_step_time():
    hw = get_profile("h100-hgx")
    for overlap in ("none", "tbo"):
        for res in (decode_step(DS, hw, _setup(overlap=overlap)), prefill_chunk(DS, hw, _setup(overlap=overlap))):
            assert sum(res.breakdown.values()) == pytest.approx(res.seconds, rel=1e-9)
    tbo = decode_step(DS, hw, _setup(overlap="tbo", batch_per_rank=256, ep=32))
    assert tbo.breakdown["overlap_hidden"] < 0


def test_tbo_formula_on_one_layer():
    # With overlap efficiency 1 the MoE layer costs max(compute, comm); with 0 it costs their sum.
    hw = get_profile("h100-hgx")
    s = _setup(ep=32, batch_per_rank=256, overlap="tbo")
    full = decode_step(DS, hw, s, replace(IDEAL, overlap_sm=1.0)).seconds
    none = decode_step(DS, hw, s, replace(IDEAL, overlap_sm=1e-9)).seconds
    serial = decode_step(DS, hw, replace(s, overlap="none"), replace(IDEAL, tile_m=64))
    assert full < none
    # Two half micro-batches without overlap cost at least one full batch (weights read twice).
    assert none >= serial.seconds * 0.999


def test_decode_scaling_and_mtp():
    hw = get_profile("b200-hgx")
    small, big = decode_step(DS, hw, _setup(batch_per_rank=16)), decode_step(DS, hw, _setup(batch_per_rank=256))
    assert big.seconds > small.seconds and big.tokens_per_s > small.tokens_per_s
    mtp = decode_step(DS, hw, _setup(batch_per_rank=64, mtp_draft=1, mtp_accept=0.8))
    assert mtp.tokens == pytest.approx(64 * 1.8) and mtp.tokens_per_seq == pytest.approx(1.8)
    assert mtp.itl_s == pytest.approx(mtp.seconds / 1.8)
    assert mtp.breakdown["mtp_draft"] > 0


def test_prefill_attention_grows_with_prompt_and_cache_hits_save_compute():
    hw = get_profile("h200-hgx")
    short = prefill_chunk(DS, hw, _setup(prompt_len=1024, prefill_chunk=8192))
    long = prefill_chunk(DS, hw, _setup(prompt_len=8192, prefill_chunk=8192))
    assert long.breakdown["attn_core"] > 4 * short.breakdown["attn_core"]
    cached = prefill_chunk(DS, hw, _setup(prompt_len=8192, cached_prefix=4096, prefill_chunk=8192))
    assert cached.breakdown["attn_core"] > long.breakdown["attn_core"]  # new tokens see the whole prefix


def test_mixed_iteration_dp_imbalance():
    # The busiest rank carries a whole prompt while the mean rank carries a fraction of one.
    hw = get_profile("b200-hgx")
    s = _setup(batch_per_rank=128)
    res = mixed_iteration(DS, hw, s, input_len=1024, output_len=2048, max_num_tokens=2048)
    one_rank = mixed_iteration(DS, hw, replace(s, ep=1, redundant_experts=0), 1024, 2048, 2048)
    assert res.tokens == 128 and res.seconds > 0 and one_rank.seconds > 0
    with pytest.raises(ValueError, match="max_num_tokens=100"):
        mixed_iteration(DS, hw, s, 1024, 2048, 100)


def test_memory_capacity():
    hw = get_profile("h100-hgx")
    assert max_batch_per_rank(DS, hw, _setup(ep=1), 3000) == 0  # 671 GB of weights on one 80 GB GPU
    assert max_batch_per_rank(DS, get_profile("h200-hgx"), _setup(ep=8), 3000) > 0


def test_setup_validation_names_field():
    with pytest.raises(ValueError, match="ep=0"):
        Setup(ep=0)
    with pytest.raises(ValueError, match="overlap='both'"):
        Setup(ep=2, overlap="both")
    with pytest.raises(ValueError, match="experts='int3'"):
        Precision(experts="int3")
    with pytest.raises(ValueError, match="dense='int4'"):  # INT4 is the routed / shared experts' weight-only format
        Precision(dense="int4")
    with pytest.raises(ValueError, match="ep=300 exceeds"):
        decode_step(DS, get_profile("h100-hgx"), Setup(ep=300))
    with pytest.raises(ValueError, match="cached_prefix=10"):
        Setup(ep=1, prompt_len=10, cached_prefix=10)


def test_measured_moe_kernels_replace_roofline(tmp_path):
    data = {"device_name": "NVIDIA H100 80GB HBM3", "rows": [
        {"shape": {"E": 256, "top_k": 8, "H": 7168, "I": 2048}, "tokens": t, "system": "moelink",
         "dtype": "fp8", "median_ms": ms} for t, ms in ((64, 0.5), (1024, 1.0), (16384, 8.0))]}
    (tmp_path / "moe_kernels_h100.json").write_text(json.dumps(data))
    (tmp_path / "moe_kernels_gb200.json").write_text(json.dumps({**data, "device_name": "NVIDIA GB200"}))
    assert load_moe_measurements("B200", tmp_path) == []  # GB200 is not B200
    measured = load_moe_measurements("H100", tmp_path)
    assert len(measured) == 1 and measured[0].points[0] == (64, 0.5e-3)
    # At EP 8 (32 local experts), 1024 tokens x 8 pairs per rank = 256 rows/expert = 8192 tokens on all 256:
    # between the 1024 and 16384 points, scaled by 32/256 experts.
    t = measured[0].time(1024 * 8, 32)
    assert 1.0e-3 * 32 / 256 < t < 8.0e-3 * 32 / 256
    hw = get_profile("h100-hgx")
    s = _setup(balance=Balance("perfect"), batch_per_rank=1024)
    with_meas = decode_step(DS, hw, replace(s, measured=tuple(measured)))
    assert with_meas.breakdown["routed_experts"] == pytest.approx(t * DS.moe_layers)
