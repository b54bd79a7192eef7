"""Smoke tests of `moelink plan` and `python -m moelink.engine.api.plan_cli`."""
from __future__ import annotations

import pytest

import json

from moelink.engine.api import plan_cli
from moelink.engine.api import cli


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_moelink_plan_prints_throughput_breakdown_and_best(tmp_path, capsys):
    js, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = cli.main(["plan", "--model", "deepseek-v3", "--hardware", "h200-hgx", "--ep", "8", "--batch-per-rank", "64",
                   "--input-len", "1000", "--output-len", "500", "--itl-slo-ms", "60", "--json", str(js),
                   "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "decode :" in out and "prefill:" in out and "output tok/s/GPU" in out and "input tok/s/GPU" in out
    assert "routed_experts" in out and "dispatch" in out and "combine" in out
    assert "best decode with ITL <= 60 ms" in out and "best prefill" in out
    res = json.loads(js.read_text())["results"]["h200-hgx"]
    assert res["decode"]["tokens_per_s_per_gpu"] > 0 and res["prefill"]["tokens_per_s_per_gpu"] > 0
    assert res["best_decode_under_slo"]["itl_ms"] <= 60
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_module_main_all_hardware_and_other_models(capsys):
    assert plan_cli.main(["--hardware", "all", "--ep", "16", "--batch-per-rank", "32"]) == 0
    out = capsys.readouterr().out
    for hw in ("h100-hgx", "h200-hgx", "b200-hgx", "gb200-nvl72"):
        assert f"| {hw} |" in out
    for model in ("kimi-k2", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x22b"):
        assert plan_cli.main(["--model", model, "--hardware", "b200-hgx", "--ep", "8", "--precision", "fp4",
                              "--batch-per-rank", "16", "--engine", "published"]) == 0
    assert "mixtral-8x22b on b200-hgx" in capsys.readouterr().out
    # moelink has no NVFP4 experts: its profile refuses FP4 with one sentence naming the flag.
    assert plan_cli.main(["--hardware", "b200-hgx", "--precision", "fp4"]) == 2
    assert "precision='fp4' is not available in engine 'moelink'" in capsys.readouterr().err


def test_bad_input_is_one_clear_error(capsys):
    assert plan_cli.main(["--hardware", "tpu-v5"]) == 2
    assert "hardware='tpu-v5' is not known" in capsys.readouterr().err
    assert cli.main(["plan", "--ep", "0"]) == 2
    assert "ep=0 must be >= 1" in capsys.readouterr().err


def test_measured_expert_counts_feed_the_imbalance(tmp_path, capsys):
    # Rank 0 of 8 gets all the hot experts: its load is 4x the others'.
    counts = [4.0] * 32 + [1.0] * 224
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"counts": counts}))
    js = tmp_path / "out.json"
    assert plan_cli.main(["--hardware", "h200-hgx", "--ep", "8", "--batch-per-rank", "32",
                               "--expert-counts", str(path), "--json", str(js)]) == 0
    res = json.loads(js.read_text())["results"]["h200-hgx"]
    assert res["decode"]["expert_imbalance"] == 4 * 32 / ((4 * 32 + 224) / 8)
    assert "measured counts (256 experts)" in capsys.readouterr().out
    path.write_text("not json")
    assert plan_cli.main(["--expert-counts", str(path)]) == 2


def test_measured_kernel_times_are_read_from_benchmarks_results():
    # The planner moved out of benchmarks/; its measured MoE timings still come from benchmarks/results.
    from moelink.planner import kernels

    assert kernels.RESULTS_DIR.is_dir() and kernels.RESULTS_DIR.parts[-2:] == ("benchmarks", "results")
