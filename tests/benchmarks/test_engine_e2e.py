"""benchmarks/engine_e2e.py on CPU: its --cpu-smoke (a one-layer toy, one small point of every part: graph-only
step, LLM.generate on the three workloads, the gRPC serving path) and the saved JSON's fields; what happens to a
point that fails or finds the time budget spent; the side-by-side fields worked out by hand. No timed assertion:
on CPU the numbers measure nothing. The smoke runs once per module, ~15 s on 2 cores (a server start included:
those tests are marked slow).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from moelink.benchmarks import e2e_generate, e2e_setup, engine_e2e
from moelink.benchmarks.e2e_report import HOST_DERIVED, HOST_FROM_ENGINE, derive
from moelink.planner.step_cost import fixed_step_cost
from tests.helpers import zygote
from tests.helpers.zygote_ray import node_env

FIELDS = e2e_setup.engine_fields()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "engine_e2e.json"
    # Its `moelink serve` (benchmarks/server_process.py: `sys.executable -m ...`) forked by the zygote too: the
    # smoke's sys.executable is the shim (zygote_ray.node_env), so the server starts with torch imported.
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.engine_e2e", "--cpu-smoke", "--kernel-times", "--out",
                       str(out)], capture_output=True, text=True, timeout=240, cwd=out.parent, env=node_env(dict(os.environ)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # the smoke starts a server subprocess (~15 s in all)
def test_smoke_runs_every_part_and_saves_the_fields(smoke):
    res, stdout = smoke
    assert res["benchmark"] == "engine_e2e" and res["device"] == "cpu" and res["cpu_smoke"] is True
    assert {"date", "commit", "torch", "python", "config", "notes", "rows", "host_timing", "layers", "wall_s",
            "planner_fixed_step_cost_ms"} <= res.keys()
    rows = res["rows"]
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")]
    modes = e2e_setup.async_modes(FIELDS)
    smoke_wl = e2e_setup.SMOKE_WORKLOADS
    (batch,) = engine_e2e.MODES["smoke"]["batches"]
    assert [r["async_scheduling"] for r in rows if r["part"] == "startup"] == modes
    (graph,) = [r for r in rows if r["part"] == "graph"]  # once per model and dtype, on the first engine
    assert graph["batch"] == batch and positive(graph["graph_ms"]) and graph["kind"].startswith("eager")
    assert graph["context"] == e2e_setup.decode_context(smoke_wl["decode"])
    assert graph["graph_tok_s"] == pytest.approx(batch / graph["graph_ms"] * 1e3)
    gen = [r for r in rows if r["part"] == "generate"]
    assert sorted((r["async_scheduling"] is True, r["workload"]) for r in gen) == sorted(
        (m is True, w) for m in modes for w in smoke_wl)
    for r in gen:
        wl = smoke_wl[r["workload"]]
        n = batch if r["workload"] == "decode" else wl.requests
        assert (r["batch"], r["input_len"], r["output_len"]) == (n, wl.input_len, wl.output_len)
        assert r["output_tokens"] == n * wl.output_len and r["input_tokens"] == n * wl.input_len
        for key in ("wall_s", "warmup_s", "e2e_tok_s", "total_tok_s", "step_ms", "step_ms_mean"):
            assert positive(r[key]), (r["workload"], key, r[key])
        assert r["e2e_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert r["steps"] >= wl.output_len - 1 and 0 <= r["full_batch_steps"] <= r["steps"]
        # FLOP rates from the toy's config (no dense bf16 peak on CPU); the prefill-heavy point profiled once more.
        f = r["flops"]
        assert f["total"] == f["linear"] + f["attention"] + f["lm_head"] and min(f.values()) > 0
        assert r["tflops_s"] == pytest.approx(f["total"] / r["wall_s"] / 1e12) and "frac_bf16_peak" not in r
        assert ("kernel_family_us" in r) == (r["workload"] == "prefill")
        if r["workload"] == "prefill":
            assert r["kernel_us"] and set(r["kernel_family_us"]) <= {"moe", "attention", "matmul", "norm", "other"}
    for r in (r for r in gen if r["workload"] == "decode"):  # side by side with the graph-only step
        assert r["graph_ms"] == graph["graph_ms"] and r["ratio"] == pytest.approx(r["e2e_tok_s"] / graph["graph_tok_s"])
        assert r["decode_step_ratio"] == pytest.approx(graph["graph_ms"] / r["step_ms"])
        assert r["exposed_ms_per_step"] == pytest.approx(r["step_ms"] - graph["graph_ms"])
        assert r["host_ms_per_step"] >= 0 and 0 <= r["overlapped_ms"] <= r["host_ms_per_step"]
        assert r["host_source"] in ("engine", "derived")
    assert res["host_timing"] in (HOST_FROM_ENGINE, HOST_DERIVED, f"{HOST_DERIVED} | {HOST_FROM_ENGINE}")
    assert res["planner_fixed_step_cost_ms"] == pytest.approx(fixed_step_cost(res)[0])
    serve = [r for r in rows if r["part"] == "serve"]
    assert [r["concurrency"] for r in serve] == engine_e2e.MODES["smoke"]["levels"]
    for r in serve:
        assert r["completed"] == r["requests"] and positive(r["out_tok_s"]) and positive(r["startup_s"])
        assert positive(r["first_request_ttft_ms"]) and r["first_request_error"] is None
        for key in ("ttft_ms", "itl_ms"):
            assert set(r[key]) == {"p50", "p99"} and r[key]["p50"] <= r[key]["p99"]
    assert "| e2e out tok/s | graph-only tok/s | e2e/graph |" in stdout and "first request TTFT ms" in stdout
    assert "moelink plan's fixed cost per step from this file" in stdout


@pytest.mark.slow  # the smoke starts a server subprocess (~15 s in all)
def test_smoke_ran_both_step_loops(smoke):
    res, _ = smoke
    loops = {(r["workload"], r["async_scheduling"]) for r in res["rows"] if r["part"] == "generate"}
    assert loops == {(w, m) for w in e2e_setup.SMOKE_WORKLOADS for m in (True, False)}
    assert "async_scheduling" in res["config"]["engine_has"]


@pytest.mark.slow  # the smoke starts a server subprocess (~15 s in all)
def test_smoke_used_dummy_weights(smoke):
    res, _ = smoke
    assert "load_format" in res["config"]["engine_has"]
    assert not any("toy checkpoint" in n for n in res["notes"])


def test_dry_run_lists_every_point(capsys):
    engine_e2e.main(["--dry-run"])
    text = capsys.readouterr().out
    for model in e2e_setup.MODELS:
        for dtype in e2e_setup.DTYPES:
            assert f"engine {model} {dtype} async_scheduling=" in text
        assert f"serve  {model} bf16: `moelink serve` + bench-serve at [16, 64, 256] concurrent" in text
    assert text.count("graph-only decode step, batch 256") == 4  # per model and dtype, on its first engine
    assert "decode-heavy: 256 requests x (128 in / 512 out)" in text
    assert "balanced: 64 requests x (1024 in / 256 out)" in text and "prefill-heavy: 128 requests x (2048 in / 8 out)" in text
    engine_e2e.main(["--dry-run", "--quick"])
    quick = capsys.readouterr().out
    assert "deepseek" not in quick and "fp8" not in quick and "(128 in / 256 out)" in quick and "run budget 480 s" in quick


@pytest.mark.slow  # builds two engines in process
def test_a_failing_point_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    real = e2e_generate.run_generate

    def flaky(llm, requests, input_len, output_len, deadline, seed=0):
        if input_len == e2e_setup.SMOKE_WORKLOADS["balanced"].input_len:
            raise RuntimeError("boom")
        return real(llm, requests, input_len, output_len, deadline, seed)

    monkeypatch.setattr(e2e_generate, "run_generate", flaky)
    out = tmp_path / "e2e.json"
    res = engine_e2e.main(["--cpu-smoke", "--no-serve", "--models", "qwen3-30b-a3b", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"]
    gen = {(r["workload"], r["async_scheduling"]): r for r in saved["rows"] if r["part"] == "generate"}
    for (workload, _), r in gen.items():
        assert (r["error"] == "RuntimeError: boom") == (workload == "balanced")
        assert workload == "balanced" or positive(r["e2e_tok_s"])
    assert not any(r["part"] == "serve" for r in saved["rows"])


def test_time_budget_spent_skips_points_but_writes_them(tmp_path):
    out = tmp_path / "e2e.json"
    engine_e2e.main(["--cpu-smoke", "--time-budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["error"].startswith("skipped") for r in rows)
    assert {r["part"] for r in rows} == {"graph", "generate", "serve"}  # no engine was started


def test_step_clock_ends_a_point_at_its_deadline():
    class Engine:
        def step(self):
            return ["a", "b"]

    eng = Engine()
    with e2e_generate.StepClock(eng, time.monotonic() + 60) as clock:
        assert eng.step() == ["a", "b"] and clock.outputs == [2] and len(clock.seconds) == 1
    assert "step" not in vars(eng)  # the wrapper is gone
    with pytest.raises(e2e_generate.PointTimeout, match="after 0 engine steps"):
        with e2e_generate.StepClock(eng, time.monotonic() - 1):
            eng.step()
    assert "step" not in vars(eng)


def _rows(serial_ms=16.0, async_ms=12.0, graph_ms=10.0, loop_stats=None):
    head = dict(model="m", dtype="bf16", batch=256)
    gen = dict(head, part="generate", workload="decode", error=None, e2e_tok_s=10_000.0, step_ms_mean=12.0)
    return [dict(head, part="graph", graph_ms=graph_ms, graph_tok_s=256 / graph_ms * 1e3),
            dict(gen, async_scheduling=True, step_ms=async_ms, loop_stats_per_step=loop_stats),
            dict(gen, async_scheduling=False, step_ms=serial_ms, loop_stats_per_step=loop_stats)]


def test_host_time_derived_from_the_loop_pair():
    """Graph-only 10 ms, serial loop 16 ms/step, async 12 ms/step: the host works 16 - 10 = 6 ms per step; the
    async loop hides 16 - 12 = 4 of them (2/3) and exposes 12 - 10 = 2 ms, which is the planner's number."""
    rows = _rows()
    assert derive(rows) == HOST_DERIVED
    _, on, off = rows
    assert (on["host_ms_per_step"], on["overlapped_ms"], on["overlapped_fraction"]) == (6.0, 4.0, pytest.approx(2 / 3))
    assert (off["host_ms_per_step"], off["overlapped_ms"], off["overlapped_fraction"]) == (6.0, 0.0, 0.0)
    assert (on["exposed_ms_per_step"], off["exposed_ms_per_step"]) == (2.0, 6.0)
    assert on["ratio"] == pytest.approx(10_000 / 25_600) and on["decode_step_ratio"] == pytest.approx(10 / 12)
    assert fixed_step_cost(dict(benchmark="engine_e2e", rows=rows))[0] == pytest.approx(2.0)


def test_host_time_from_the_engines_own_counters():
    """With LLMEngine.loop_stats: mean step 12 ms of which 3 ms waiting for the device -> 9 ms of host work, of
    which the 10 ms device step covered 10 - 3 = 7 ms."""
    rows = _rows(loop_stats=dict(steps=1.0, wait_ms=3.0, launch_ms=4.0, collect_ms=5.0))
    assert derive(rows) == HOST_FROM_ENGINE
    assert (rows[1]["host_ms_per_step"], rows[1]["overlapped_ms"], rows[1]["host_source"]) == (9.0, 7.0, "engine")


def test_layers_fit_beside_the_decode_batch_not_the_queued_prefills(monkeypatch):
    """On an 80 GB GPU (faked): Qwen3-30B-A3B builds what engine_decode's rule fits beside 256 sequences of
    128 + 512 tokens; the prefill-heavy workload (128 x 2k tokens, queued as needed) does not lower it; all of
    DeepSeek-V2-Lite's 27 layers fit."""
    import torch

    from moelink.benchmarks.engine_decode import pick_layers

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    gpu = torch.device("cuda", 0)
    qwen, dsv2 = e2e_setup.MODELS["qwen3-30b-a3b"][0], e2e_setup.MODELS["deepseek-v2-lite"][0]
    full = list(e2e_setup.FULL.values())
    got = e2e_setup.layers_that_fit(qwen, full, [1, 64, 256], gpu)
    assert got == pick_layers(qwen, 256, 640, gpu) == e2e_setup.layers_that_fit(qwen, full[:2], [1, 64, 256], gpu)
    assert 30 <= got < qwen["num_hidden_layers"]
    assert e2e_setup.layers_that_fit(dsv2, full, [1, 64, 256], gpu) == dsv2["num_hidden_layers"]
