"""moelink's speculative (MTP) steps in the cluster model (planner/spec_cost.py): the moelink profile accepts
--mtp-draft and prices how the engine runs them (eager draft forwards, the serial loop's host work; verify steps
replay graphs, on one rank and under expert parallelism) from the measured results, or from documented
constants."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moelink.planner.engines import get_engine
from moelink.planner.hardware import get_profile
from moelink.planner.models import MODELS
from moelink.planner.plan import PlanInputs, decode_at
from moelink.planner.spec_cost import (FALLBACK_EAGER_LAYER_S, FALLBACK_HOST_S_PER_SEQ, SpecCost, eager_layer_cost,
                                       host_cost, spec_cost)

DS = MODELS["deepseek-v3"]


def _inp(**kw) -> PlanInputs:
    return PlanInputs(model=DS, hardware=get_profile("h100-hgx"), ep=kw.pop("ep", 32), batch_per_rank=32,
                      precision="fp8", **kw)


def test_costs_come_from_the_measured_results(tmp_path):
    (tmp_path / "engine_decode_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps({
        "device": "cuda NVIDIA H100 80GB HBM3",
        "results": [{"layers": 40, "step_ms": 44.0, "graph_step_ms": 4.0},   # 1.0 ms per layer
                    {"layers": 40, "step_ms": 24.0, "graph_step_ms": 8.0},   # 0.4
                    {"layers": 40, "step_ms": "broken"}]}))
    (tmp_path / "host_overhead_cpu.json").write_text(json.dumps({
        "date": "2026-11-23", "device": "cpu",
        "step_loop": {"cpu_host_only_us_per_seq": {"async_on": 5.0, "async_off": 6.0}}}))
    (tmp_path / "host_overhead_old.json").write_text(json.dumps({
        "date": "2026-01-01", "device": "cpu",
        "step_loop": {"cpu_host_only_us_per_seq": {"async_on": 50.0, "async_off": 60.0}}}))
    layer, text = eager_layer_cost("H100-SXM", tmp_path)
    assert layer == pytest.approx(0.7e-3) and "engine_decode_NVIDIA_H100_80GB_HBM3.json" in text
    other, text = eager_layer_cost("B200", tmp_path)  # another GPU's measurement, and it says so
    assert other == pytest.approx(0.7e-3) and "another GPU" in text
    host, text = host_cost(tmp_path)
    assert host == pytest.approx(6e-6) and "host_overhead_cpu.json" in text  # the newest file
    empty = tmp_path / "empty"
    empty.mkdir()
    cost = spec_cost("H100", empty)
    assert (cost.eager_layer_s, cost.host_s_per_seq) == (FALLBACK_EAGER_LAYER_S, FALLBACK_HOST_S_PER_SEQ)
    assert cost.text.count("assumed") == 2
    with pytest.raises(ValueError, match="eager_layer_s=-1 must be a finite number >= 0"):
        SpecCost(-1, 0.0, "")


def test_moelink_prices_eager_drafts_and_the_serial_loop():
    profile = get_engine("moelink", "H100-SXM")
    spec = profile.efficiency.spec
    assert spec is not None and spec.eager_layer_s > 0 and spec.host_s_per_seq > 0
    assert any("speculative steps" in f.name for f in profile.features)
    inp = _inp(mtp_draft=1, mtp_accept=0.85)
    ep8, _ = decode_at(inp, 8, 32)
    one, _ = decode_at(replace(inp, ep=1), 1, 32)
    # Every speculative step: the host's work per sequence (serial loop) and the eager draft forward.
    for res in (ep8, one):
        assert res.breakdown["spec_host"] == pytest.approx(spec.host_s_per_seq * 32)
        assert res.breakdown["spec_eager_drafts"] == pytest.approx(spec.eager_layer_s)
    # Verify steps replay graphs on one rank and under EP alike: nothing per layer beyond the device work.
    for res in (ep8, one):
        assert {k for k in res.breakdown if k.startswith("spec_")} == {"spec_host", "spec_eager_drafts"}
    # The published engines graph and overlap them: nothing beyond the device work.
    pub, _ = decode_at(replace(inp, engine="published"), 8, 32)
    assert not any(k.startswith("spec_") for k in pub.breakdown)
    # What the extras add is all they change: the same plan without them is that much faster.
    bare, _ = decode_at(inp, 8, 32, eff=replace(profile.efficiency, spec=None))
    extras = sum(v for k, v in ep8.breakdown.items() if k.startswith("spec_"))
    assert ep8.seconds - bare.seconds == pytest.approx(extras)
    plain, _ = decode_at(_inp(), 8, 32)
    assert "spec_host" not in plain.breakdown
