"""Engine profiles, measured kernels, dollars and the planner's knobs (issue 19)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moelink.engine.api import plan_cli
from moelink.planner.costs import request_gpu_seconds, usd_per_million
from moelink.planner.engines import MOELINK, PUBLISHED, get_engine
from moelink.planner.hardware import get_profile
from moelink.planner.kernels import RESULTS_DIR, load_moe_measurements, measured_efficiency
from moelink.planner.models import get_model
from moelink.planner.plan import PlanInputs, decode_at, kernel_source, make_setup, plan, prefill_at
from moelink.planner.step_model import decode_step, max_batch_per_rank, weights_per_rank_bytes

DS = get_model("deepseek-v3")


def _inp(hw="h100-hgx", **kw) -> PlanInputs:
    base = dict(model=DS, hardware=get_profile(hw), ep=8, batch_per_rank=64)
    base.update(kw)
    return PlanInputs(**base)


# --- measured kernels -------------------------------------------------------------------------------------


def test_loader_reads_the_committed_h100_moe_kernel_files():
    files = sorted(RESULTS_DIR.glob("moe_kernels_NVIDIA_H100_80GB_HBM3_*.json"))
    assert files, "the committed H100 measurements are the point of this test"
    meas = load_moe_measurements("H100")
    by_key = {(m.num_experts, m.hidden, m.dtype): m for m in meas}
    # DeepSeek-V3 (E 256, D 7168, I 2048) in BF16 and FP8, Qwen3-30B-A3B, Mixtral: moelink's own rows only.
    for key in ((256, 7168, "bf16"), (256, 7168, "fp8"), (128, 2048, "bf16"), (128, 2048, "fp8"), (8, 4096, "bf16")):
        assert key in by_key, key
    fp8 = by_key[(256, 7168, "fp8")]
    raw = json.loads((RESULTS_DIR / "moe_kernels_NVIDIA_H100_80GB_HBM3_deepseek-v3_fp8.json").read_text())
    expect = sorted((r["tokens"], r["median_ms"] * 1e-3) for r in raw["results"] if r["system"] == "fp8")
    assert [p[0] for p in fp8.points] == [e[0] for e in expect]
    assert [p[1] for p in fp8.points] == pytest.approx([e[1] for e in expect])
    # FP8's matmul fraction is of the FP8 ceiling (twice BF16's): the file states it against BF16.
    best_bf16_frac = max(r["frac_matmul_bf16"] for r in raw["results"] if r["system"] == "fp8")
    assert fp8.matmul_frac == pytest.approx(best_bf16_frac / 2)
    assert 0.5 < fp8.memory_frac <= 1.0
    # The per-shape BF16 series (7 token counts) wins over the 4-point tuning run and the 2-point check run.
    bf16 = by_key[(256, 7168, "bf16")]
    assert len(bf16.points) == 7 and bf16.source == "moe_kernels_NVIDIA_H100_80GB_HBM3_deepseek-v3.json"


def test_loader_skips_baselines_and_prefers_longer_series(tmp_path):
    def row(system, tokens, ms):
        return {"shape": "x", "E": 16, "K": 2, "D": 256, "I": 128, "tokens": tokens, "system": system,
                "median_ms": ms, "frac_copy_bw": 0.5, "frac_matmul": 0.4}

    data = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
            "results": [row("torch-grouped_mm", 1, 0.01), row("per-expert-loop", 1, 9.0),
                        row("moelink-triton", 1, 1.0), row("moelink-triton", 64, 2.0)]}
    (tmp_path / "moe_kernels_a.json").write_text(json.dumps(data))
    short = {**data, "results": [row("moelink-triton", 1, 5.0)]}
    (tmp_path / "moe_kernels_b.json").write_text(json.dumps(short))
    (tmp_path / "moe_kernels_c.json").write_text("{not json")
    meas = load_moe_measurements("H100", tmp_path)
    assert len(meas) == 1 and meas[0].points == ((1.0, 1e-3), (64.0, 2e-3)) and meas[0].dtype == "bf16"
    assert measured_efficiency(meas, "bf16") == (0.4, 0.5, "moe_kernels_a.json")
    assert measured_efficiency(meas, "fp8") is None


def test_moelink_engine_uses_measured_kernels_where_present():
    # On the measured GPU: the measured times themselves.
    h100 = _inp(precision="fp8")
    src = kernel_source(h100)
    assert src["kind"] == "measured" and src["measured"][0].dtype == "fp8"
    setup = make_setup(h100, 8, 64, "none")
    meas = src["measured"][0]
    res = decode_step(DS, h100.hardware, setup, MOELINK.efficiency)
    pairs = 64 * DS.top_k * res.imbalance
    assert res.breakdown["routed_experts"] == pytest.approx(meas.time(pairs, 256 / 8) * DS.moe_layers)
    # On another GPU: the measured efficiency fractions, not the published engines' 0.6 GEMM efficiency.
    h200 = _inp("h200-hgx", precision="fp8")
    src = kernel_source(h200)
    assert src["kind"] == "efficiency" and src["expert_eff"][0] < PUBLISHED.efficiency.gemm
    pre_moelink = prefill_at(h200, 8)[0]
    pre_published = prefill_at(replace(h200, engine="published"), 8)[0]
    assert pre_moelink.breakdown["routed_experts"] > pre_published.breakdown["routed_experts"]
    assert kernel_source(replace(h200, engine="published"))["kind"] == "assumed"


def test_engine_profiles_refuse_modes_they_do_not_have():
    with pytest.raises(ValueError, match="precision='fp4' is not available in engine 'moelink'"):
        _inp(precision="fp4")
    with pytest.raises(ValueError, match="pattern='expert' is not available in engine 'moelink'"):
        _inp(pattern="expert")
    _inp(mtp_draft=2, mtp_accept=0.8)  # moelink runs MTP since issue 29 (priced: test_planner_spec_cost.py)
    _inp(attn_tp=8)  # moelink runs tensor-parallel attention since issue 46 (-tp)
    with pytest.raises(ValueError, match="engine='vllm' is not known"):
        get_engine("vllm")
    _inp(engine="published", precision="fp4", pattern="expert", mtp_draft=2, mtp_accept=0.8, attn_tp=8)
    # moelink's overlap is SM-based: it never takes the RDMA-only overlap fraction.
    assert MOELINK.efficiency.overlap_rdma == MOELINK.efficiency.overlap_sm


def test_plan_prints_features_with_status_and_every_assumption(capsys):
    assert plan_cli.main(["--hardware", "h200-hgx", "--ep", "8", "--batch-per-rank", "32"]) == 0
    out = capsys.readouterr().out
    assert "features (engine moelink; [x] = this prediction assumes it):" in out
    assert "two-batch overlap of all-to-all with compute (overlap tbo): built, not GPU-measured" in out
    assert "[x] Triton grouped-GEMM MoE kernels (BF16, FP8 block-scaled): built, GPU-measured" in out
    assert "[ ] multi-token prediction (MTP) drafts, verified in one step: built, not GPU-measured" in out
    assert "[ ] node-aware two-level all-to-all (pattern node)" in out  # default pattern: once per rank
    assert "[x] all-to-all once per destination rank (pattern rank)" in out
    assert plan_cli.main(["--hardware", "h200-hgx", "--ep", "16", "--batch-per-rank", "32", "--pattern", "node"]) == 0
    assert "[x] node-aware two-level all-to-all (pattern node)" in capsys.readouterr().out
    for phrase in ("assumptions:", "routed experts: moelink's measured fp8 kernel efficiency",
                   "two-batch overlap hides", "fixed costs:", "links:", "prefix-cache hit rate 0%",
                   "assumed for H200"):
        assert phrase in out, phrase


# --- dollars -----------------------------------------------------------------------------------------------


def test_reproduces_lmsys_kimi_k2_cost_per_million_output_tokens():
    # LMSYS, "Deploying Kimi K2 with PD Disaggregation and Large-Scale EP on 128 H200 GPUs" (2025-07-20):
    # 1P1D, 4 prefill + 12 decode nodes; 384k output tok/s; "~$0.21 per 1M output tokens (H200 $2.3/hour)".
    # The figure prices all 128 GPUs (prefill + decode pools) against the output throughput:
    # 2.3 * 128 / 3600 / 384e3 * 1e6 = $0.213. (Counting the 96 decode GPUs alone would give $0.16.)
    published = 0.21
    ours = usd_per_million(384e3 / 128, 2.3)
    assert ours == pytest.approx(published, rel=0.10)
    assert usd_per_million(384e3 / 96, 2.3) == pytest.approx(0.16, rel=0.02)
    with pytest.raises(ValueError, match="utilization=0"):
        usd_per_million(1000, 2.0, utilization=0)


def test_request_blend_and_prefill_decode_ratio():
    pre, dec = request_gpu_seconds(2000, 100, prefill_tps=28000, decode_tps=4000, prefix_hit=0.5)
    assert pre == pytest.approx(1000 / 28000) and dec == pytest.approx(100 / 4000)
    with pytest.raises(ValueError, match="prefix_hit=1"):
        request_gpu_seconds(1, 1, 1, 1, prefix_hit=1)


def test_cost_block_price_utilization_and_prefix_hits():
    base = plan(_inp("h200-hgx", batch_per_rank=32))
    c = base["cost"]
    dec = base["best_decode_under_slo"]["tokens_per_s_per_gpu"]
    pre = base["best_prefill"]["tokens_per_s_per_gpu"]
    assert c["gpu_hour_usd"] == 2.3 and "assumed" in c["price_source"]
    assert c["usd_per_m_output"] == pytest.approx(2.3 / 3600 / dec * 1e6)
    assert c["usd_per_m_input"] == pytest.approx(2.3 / 3600 / pre * 1e6)
    # the KV handoff's gather and scatter of block rows hold each side's SMs; its copies run beside the steps
    # (planner/kv_handoff.py)
    h = base["kv_handoff"]
    assert c["prefill_to_decode_gpus"] == pytest.approx((2000 / pre + h["gpu_gather_ms"] / 1e3) /
                                                        (1000 / dec + h["gpu_gather_ms"] / 1e3))
    # Price and utilization scale the dollars, not the throughput.
    dear = plan(_inp("h200-hgx", batch_per_rank=32, gpu_hour_usd=4.6, utilization=0.5))["cost"]
    assert dear["usd_per_m_output"] == pytest.approx(4 * c["usd_per_m_output"])
    assert dear["price_source"] == "--gpu-hour-usd"
    # Prefix hits: fewer computed prompt tokens, a cheaper input token and fewer prefill GPUs per decode GPU.
    hit = plan(_inp("h200-hgx", batch_per_rank=32, prefix_hit=0.5))
    assert hit["cost"]["usd_per_m_input"] < c["usd_per_m_input"]
    assert hit["cost"]["prefill_to_decode_gpus"] < c["prefill_to_decode_gpus"]
    assert make_setup(_inp(prefix_hit=0.5), 8, 1, "none").cached_prefix == 1000
    with pytest.raises(ValueError, match="gpu_hour_usd=0"):
        _inp(gpu_hour_usd=0)
    with pytest.raises(ValueError, match="prefix_hit=1.0"):
        _inp(prefix_hit=1.0)


def test_cli_cost_flags(capsys):
    args = ["--hardware", "h200-hgx", "--ep", "8", "--batch-per-rank", "32"]
    assert plan_cli.main(args + ["--gpu-hour-usd", "3.0", "--utilization", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "cost at $3.00/GPU-hour (--gpu-hour-usd), utilization 60%" in out and "per M output tokens" in out
    assert "prefill:decode GPUs =" in out
    assert plan_cli.main(args + ["--utilization", "1.5"]) == 2
    assert "utilization=1.5 must be in (0, 1]" in capsys.readouterr().err


# --- knobs -------------------------------------------------------------------------------------------------


def test_redundant_experts_knob():
    inp = _inp(ep=8, redundant_experts=32)
    s = make_setup(inp, 8, 64, "none")
    assert s.redundant_experts == 32
    assert weights_per_rank_bytes(DS, s) > weights_per_rank_bytes(DS, make_setup(_inp(), 8, 64, "none"))
    with pytest.raises(ValueError, match="redundant_experts=5"):
        make_setup(_inp(redundant_experts=5), 8, 64, "none")
    res = plan(_inp("h200-hgx", redundant_experts=32))
    assert all((256 + 32) % r["ep"] == 0 for r in res["sweep"]) and res["inputs"]["redundant_experts"] == 32


def test_tp_attention_knob_cuts_weight_reads_at_batch_one():
    dp = _inp("b200-hgx", engine="published", batch_per_rank=1)
    tp = replace(dp, attn_tp=8)
    r_dp, _ = decode_at(dp, 8, 1)
    r_tp, _ = decode_at(tp, 8, 1)
    # At batch 1 attention projections are weight-bound: 8 GPUs each read an eighth of them.
    assert r_tp.breakdown["attn_proj"] < 0.3 * r_dp.breakdown["attn_proj"]
    assert r_tp.breakdown["attn_allreduce"] > 0 and "attn_allreduce" not in r_dp.breakdown
    # The MoE block on each GPU's slice of the group's rows, gathered back over NVLink (no expert work twice).
    assert r_tp.breakdown["moe_tp_gather"] > 0 and "moe_tp_gather" not in r_dp.breakdown
    assert r_tp.seconds < r_dp.seconds
    # MLA keeps the whole latent of the group's sequences on every GPU: fewer sequences fit per GPU.
    s_dp, s_tp = make_setup(dp, 8, 1, "none"), make_setup(tp, 8, 1, "none")
    hw = dp.hardware
    assert max_batch_per_rank(DS, hw, s_tp, 3000) < max_batch_per_rank(DS, hw, s_dp, 3000)


def test_mtp_drafts_at_batch_one_raise_tokens_per_user():
    base = _inp("b200-hgx", engine="published", batch_per_rank=1, precision="fp4")
    plain, _ = decode_at(base, 8, 1)
    mtp, _ = decode_at(replace(base, mtp_draft=3, mtp_accept=0.8), 8, 1)
    assert mtp.tokens_per_seq == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert mtp.breakdown["mtp_draft"] > 0
    assert 1 / mtp.itl_s > 1.5 / plain.itl_s  # ~2.95 tokens for a bit more than one step's time


def test_mixed_serving_knob(capsys):
    mixed = _inp("b200-hgx", engine="published", precision="fp4", serving="mixed", input_len=1024,
                 output_len=2048, max_num_tokens=1536, itl_slo_ms=200)
    res = plan(mixed)
    dis = plan(replace(mixed, serving="disaggregated"))
    # The same batch does more work per iteration when it also prefills: slower than pure decode.
    assert res["decode"]["step_ms"] > dis["decode"]["step_ms"]
    assert res["cost"]["usd_per_m_input"] == 0.0 and "mixed serving" in res["cost"]["note"]
    with pytest.raises(ValueError, match="serving='both'"):
        replace(mixed, serving="both")
    assert plan_cli.main(["--hardware", "b200-hgx", "--serving", "mixed", "--max-num-tokens", "2048",
                          "--batch-per-rank", "64"]) == 0
    assert "mixed serving: prompts are processed on the same GPUs" in capsys.readouterr().out


def test_blackwell_ultra_profiles():
    b300, gb300, b200 = get_profile("b300-hgx"), get_profile("gb300-nvl72"), get_profile("b200-hgx")
    assert b300.gpu.peak_flops("nvfp4") > b200.gpu.peak_flops("nvfp4") and b300.gpu.hbm_gb == 288
    assert gb300.fabric.domain_size == 72 and gb300.gpu_hour_usd > get_profile("gb200-nvl72").gpu_hour_usd
    # More HBM, same bandwidth: a bigger batch fits, so FP4 decode per GPU is at least B200's.
    inp = _inp("b200-hgx", engine="published", precision="fp4")
    fast = plan(replace(inp, hardware=b300))["best_decode_under_slo"]["tokens_per_s_per_gpu"]
    assert fast >= plan(inp)["best_decode_under_slo"]["tokens_per_s_per_gpu"]


# --- report ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_report_writes_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "r" / "cost.md"
    assert plan_cli.main(["--model", "deepseek-v3", "--hardware", "h200-hgx,gb300-nvl72", "--report",
                          str(out)]) == 0
    text = out.read_text()
    for png in ("cost_pareto.png", "cost_cost.png"):
        path = out.with_name(png)
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
        assert f"]({png})" in text
    assert "| gb300-nvl72 | moelink | fp8 |" in text and "| gb300-nvl72 | published | fp4 |" in text
    assert "| h200-hgx | published | fp4 |" not in text  # Hopper has no FP4 tensor cores
    assert "built, not GPU-measured" in text and "GPU_HOUR_USD" in text


def test_pareto_frontier_is_a_frontier():
    from moelink.planner.cost_report import pareto_points

    pts = pareto_points(_inp("h200-hgx"))
    assert len(pts) >= 3
    users, gpus = [p[0] for p in pts], [p[1] for p in pts]
    assert users == sorted(users) and gpus == sorted(gpus, reverse=True)
    assert all(math.isfinite(u) and g > 0 for u, g in zip(users, gpus))


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_report_for_all_hardware_without_a_path_within_a_minute(tmp_path, monkeypatch, capsys):
    # The acceptance command, as typed: `moelink plan --model deepseek-v3 --hardware all --report`.
    import time

    from moelink.engine.api import cli

    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert cli.main(["plan", "--model", "deepseek-v3", "--hardware", "all", "--report"]) == 0
    assert time.perf_counter() - start < 60
    text = (tmp_path / "cost_report_deepseek-v3.md").read_text()
    for hw in ("h100-hgx", "h200-hgx", "b200-hgx", "gb200-nvl72", "b300-hgx", "gb300-nvl72"):
        assert f"| {hw} | moelink | fp8 |" in text
    assert (tmp_path / "cost_report_deepseek-v3_pareto.png").stat().st_size > 10_000
    assert (tmp_path / "cost_report_deepseek-v3_cost.png").stat().st_size > 10_000


def test_moelink_fixed_cost_fitted_on_batch_one_predicts_other_batches(tmp_path):
    from moelink.planner.engine_measured import DecodePoint, check, fit_layer_overhead, load_engine_decode

    points = load_engine_decode()
    assert {p.batch for p in points} >= {1, 16, 64, 256} and {p.model for p in points} == {"qwen3-30b-a3b"}
    eff = get_engine("moelink").efficiency
    assert eff.layer_overhead_s == pytest.approx(fit_layer_overhead(MOELINK.efficiency))
    assert eff.layer_overhead_s < MOELINK.efficiency.layer_overhead_s  # graphs: less than the published 120 us
    rows = check(eff)
    fitted = [r for r in rows if r["batch"] == 1]
    # One fixed cost, the mean of each series' batch-1 fit: over the series it predicts their batch-1 steps exactly.
    assert sum(r["predicted_us"] - r["measured_us"] for r in fitted) == pytest.approx(0.0, abs=1e-6)
    # Unseen batches within 10 % where the device's MoE kernel is measured across batch sizes (the H100's moe runs).
    # The H200 has only the first plan's kernel smoke (1 and 1024 tokens), so its mid-size predictions interpolate
    # across that gap (batch 64: -36 %, 2026-11-26); a full `moe` step on an H200 gives it a series of its own.
    unseen = [r for r in rows if r["batch"] > 1 and "H100" in r["device"]]
    assert len(unseen) >= 3 and all(abs(r["error"]) <= 0.10 for r in unseen), unseen
    # The fit follows the measurement: a slower batch-1 step gives a larger fixed cost.
    p1 = min(points, key=lambda p: p.batch)
    slow = replace(p1, per_layer_s=p1.per_layer_s + 50e-6)
    assert fit_layer_overhead(MOELINK.efficiency, (slow,)) == pytest.approx(
        fit_layer_overhead(MOELINK.efficiency, (p1,)) + 50e-6)
    assert fit_layer_overhead(MOELINK.efficiency, ()) is None
    assert load_engine_decode(tmp_path) == ()
    assert any("per-layer fixed cost" in f.name and f.status == "built, GPU-measured"
               for f in get_engine("moelink").features)
    assert isinstance(p1, DecodePoint)


def test_calibrate_prints_the_moelink_engine_check(capsys, tmp_path):
    out = tmp_path / "cal.json"
    assert plan_cli.main(["--calibrate", "--json", str(out)]) == 0
    assert "moelink's own engine (per-layer decode time" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["moelink_engine_check"]) >= 4
