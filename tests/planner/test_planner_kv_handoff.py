"""planner/kv_handoff.py: the KV handoff of disaggregated serving, sized from the model and priced with moelink's
measured transport (benchmarks/results/kv_transfer_cpu.json)."""
from __future__ import annotations

import json

import pytest

from moelink.planner.hardware import get_profile
from moelink.planner.kv_handoff import handoff_cost, measured_transport_gbps
from moelink.planner.models import get_model
from moelink.planner.plan import PlanInputs, plan


def _inp(hw="h100-hgx", **kw) -> PlanInputs:
    return PlanInputs(**{**dict(model=get_model("deepseek-v3"), hardware=get_profile(hw), ep=8, batch_per_rank=64), **kw})


def test_deepseek_v3_handoff_bytes_by_hand_and_the_measured_rate():
    res = plan(_inp(input_len=2000))
    h = res["kv_handoff"]
    # MLA: one 512 + 64 latent row per token and layer, bf16, 61 layers, the whole 2,000-token prompt
    assert h["bytes_per_request"] == 61 * 576 * 2 * 2000
    gbps, source = measured_transport_gbps()
    assert h["transport_gbps"] == pytest.approx(gbps) and "kv_transfer_cpu.json" in source
    assert h["save_ms"] == pytest.approx(61 * 576 * 2 * 2000 / 50e9 * 1e3)  # PCIe 5.0 x16 on HGX
    assert h["wire_ms"] == pytest.approx(1.0 + h["bytes_per_request"] / min(gbps * 1e9, 50e9 * 0.8) * 1e3, rel=0.05)
    assert h["link"] == "ib-ndr-400"  # HGX pools are on different nodes
    assert h["ttft_ms"] == pytest.approx(h["ttft_prefill_ms"] + h["ttft_added_ms"] + h["ttft_first_decode_ms"])
    # the save, then the wire with each layer's load behind it: the last of 61 layers lands after the wire
    assert h["ttft_added_ms"] == pytest.approx(h["save_ms"] + max(h["wire_ms"], h["load_ms"]) + h["load_ms"] / 61)
    # GPU time per side: a read and a write of the bytes in HBM (H100: 3.35 TB/s at its copy fraction)
    hbm = get_profile("h100-hgx").gpu.ceiling_hbm_bytes_per_s
    assert h["gpu_gather_ms"] == pytest.approx(2 * h["bytes_per_request"] / hbm * 1e3)


def test_the_handoff_grows_with_the_prompt_and_only_disaggregated_serving_has_one():
    small, big = (plan(_inp(input_len=n))["kv_handoff"] for n in (1000, 8000))
    assert big["bytes_per_request"] == 8 * small["bytes_per_request"] and big["wire_ms"] > small["wire_ms"]
    assert plan(_inp(serving="mixed"))["kv_handoff"] is None


def test_an_nvl72_rack_hands_off_over_nvlink_and_grace_copies_faster():
    h = plan(_inp("gb200-nvl72"))["kv_handoff"]
    assert h["link"] == "nvlink5" and h["save_ms"] < plan(_inp())["kv_handoff"]["save_ms"]


def test_a_missing_or_empty_measurement_is_named(tmp_path):
    with pytest.raises(ValueError, match="run `python -m moelink.benchmarks.kv_transfer"):
        measured_transport_gbps(tmp_path / "none.json")
    (tmp_path / "k.json").write_text(json.dumps({"rows": [{"transport": "shm", "transport_gbps": 1.0}]}))
    with pytest.raises(ValueError, match="no rows for transport 'tcp'"):
        measured_transport_gbps(tmp_path / "k.json")
    with pytest.raises(ValueError, match="must be positive"):
        handoff_cost(0, 10, get_profile("h100-hgx"), (1.0, "x"))
