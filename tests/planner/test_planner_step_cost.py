"""`moelink plan`'s fixed cost per engine step (planner/step_cost.py): taken from the newest engine_e2e result
measured on the plan's GPU, written here in the benchmark's own format (its rows, its `derive`, its writer);
the documented constant, with a message saying why, when there is none or it cannot be used."""
from __future__ import annotations

import json

import pytest

from moelink.benchmarks.e2e_report import derive
from moelink.engine.api.provenance import write_result
from moelink.planner import engines, step_cost
from moelink.planner.efficiency import DEFAULT_EFFICIENCY
from moelink.planner.hardware import get_profile
from moelink.planner.models import get_model
from moelink.planner.plan import PlanInputs, plan
from moelink.planner.step_cost import FALLBACK_S, fixed_step_cost, step_cost_for_gpu

H100 = "NVIDIA H100 80GB HBM3"


def e2e_result(device: str = H100, date: str = "2026-12-01", model: str = "qwen3-30b-a3b",
               graph_ms: dict | None = None, step_ms: dict | None = None) -> dict:
    """A result as engine_e2e writes it: graph-only rows, decode-heavy rows for both loops (and a balanced row),
    the side-by-side fields filled by the benchmark's own derive()."""
    graph_ms = graph_ms or {1: 4.0, 256: 25.0}
    step_ms = step_ms or {1: 9.0, 256: 26.5}  # the async loop; the serial one is 3 ms slower
    rows = []
    for dtype in ("bf16", "fp8"):
        for b, g in graph_ms.items():
            rows.append(dict(part="graph", model=model, dtype=dtype, async_scheduling=True, batch=b, error=None,
                             context=384, graph_ms=g, graph_tok_s=b / g * 1e3, kind="cuda_graph"))
        for am, extra in ((True, 0.0), (False, 3.0)):
            for b in graph_ms:
                s = step_ms[b] + extra + (-1.0 if dtype == "fp8" else 0.0)
                rows.append(dict(part="generate", model=model, dtype=dtype, async_scheduling=am, batch=b, error=None,
                                 workload="decode", input_len=128, output_len=512, e2e_tok_s=b / s * 900,
                                 step_ms=s, step_ms_mean=s * 1.1, loop_stats_per_step=None))
            rows.append(dict(part="generate", model=model, dtype=dtype, async_scheduling=True, batch=64, error=None,
                             workload="balanced", input_len=1024, output_len=256, e2e_tok_s=3000.0, step_ms=40.0))
    doc = dict(benchmark="engine_e2e", format=1, device=device, date=date, commit="abc1234", rows=rows)
    doc["host_timing"] = derive(rows)
    return doc


@pytest.fixture
def clean_profiles():
    engines._measured_moelink.cache_clear()
    yield
    engines._measured_moelink.cache_clear()


def test_fixed_cost_is_the_default_loops_largest_bf16_batch():
    ms, what = fixed_step_cost(e2e_result())
    assert ms == pytest.approx(26.5 - 25.0)  # async on, batch 256, bf16 (not fp8's 0.5, not serial's 4.5)
    assert "qwen3-30b-a3b batch 256: 1.50 ms" in what and "bf16" in what


def test_planner_reads_the_benchmarks_file_and_uses_it(tmp_path, monkeypatch, clean_profiles):
    write_result(tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3_qwen3-30b-a3b_bf16.json", e2e_result())
    cost = step_cost_for_gpu("H100-SXM", tmp_path)
    assert cost.measured and cost.seconds == pytest.approx(1.5e-3)
    assert "1.50 ms measured by benchmarks/engine_e2e.py on NVIDIA H100 80GB HBM3" in cost.text
    assert "engine_e2e_NVIDIA_H100_80GB_HBM3_qwen3-30b-a3b_bf16.json; 2026-12-01, commit abc1234" in cost.text

    monkeypatch.setattr(step_cost, "RESULTS_DIR", tmp_path)
    model = get_model("qwen3-30b-a3b")
    on_h100 = plan(PlanInputs(model, get_profile("h100-hgx"), ep=1, batch_per_rank=64, precision="bf16"))
    assert on_h100["decode"]["breakdown_ms"]["step_overhead"] == pytest.approx(1.5)
    (line,) = [a for a in on_h100["assumptions"] if a.startswith("fixed costs:")]
    assert "per step 1.50 ms measured by benchmarks/engine_e2e.py" in line
    (feat,) = [f for f in on_h100["engine"]["features"] if f["feature"].startswith("fixed cost per engine step")]
    assert feat["status"] == engines.BUILT_MEASURED and "1.50 ms" in feat["feature"]
    # No measurement on an H200: the documented constant, and the plan says so.
    on_h200 = plan(PlanInputs(model, get_profile("h200-hgx"), ep=1, batch_per_rank=64, precision="bf16"))
    assert on_h200["decode"]["breakdown_ms"]["step_overhead"] == pytest.approx(DEFAULT_EFFICIENCY.step_overhead_s * 1e3)
    (line,) = [a for a in on_h200["assumptions"] if a.startswith("fixed costs:")]
    assert "2.0 ms assumed" in line and "no engine_e2e_*.json result measured on H200" in line
    # The published engines keep their constant whatever was measured.
    assert engines.get_engine("published", "H100-SXM").efficiency.step_overhead_s == FALLBACK_S


@pytest.mark.parametrize("content, why", [
    (None, "no engine_e2e_*.json result measured on H100"),
    ("{not json", "is unreadable (JSONDecodeError"),
    (json.dumps({"benchmark": "engine_e2e", "device": H100}), "is unusable: it has no 'rows' list"),
    (json.dumps({"benchmark": "moe_kernels", "device": H100, "rows": []}), "is unusable: not an engine_e2e result"),
    ("ERRORS", "is unusable: it has no decode-heavy row"),
])
def test_falls_back_with_a_clear_message(tmp_path, content, why):
    if content == "ERRORS":  # every decode-heavy point failed on the GPU
        doc = e2e_result()
        for r in doc["rows"]:
            r["error"] = "RuntimeError: CUDA out of memory"
        content = json.dumps(doc)
    if content is not None:
        (tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3.json").write_text(content)
    cost = step_cost_for_gpu("H100-SXM", tmp_path)
    assert not cost.measured and cost.seconds == FALLBACK_S == DEFAULT_EFFICIENCY.step_overhead_s
    assert cost.text.startswith("2.0 ms assumed (published engines' step traces): ") and why in cost.text, cost.text
    assert not step_cost_for_gpu(None, tmp_path).measured


def test_newest_session_wins_and_its_files_pool(tmp_path):
    write_result(tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3_old.json",
                 e2e_result(date="2026-11-30", step_ms={1: 9.0, 256: 35.0}))  # 10 ms exposed: superseded
    write_result(tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3_qwen.json", e2e_result())  # 1.5 ms
    write_result(tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3_dsv2.json",
                 e2e_result(model="deepseek-v2-lite", step_ms={1: 9.0, 256: 27.5}))  # 2.5 ms
    write_result(tmp_path / "engine_e2e_NVIDIA_H100_80GB_HBM3_serve.json",  # same session, serving only: no row
                 dict(benchmark="engine_e2e", device=H100, date="2026-12-01", rows=[dict(part="serve")]))
    write_result(tmp_path / "engine_e2e_NVIDIA_GB200.json", e2e_result(device="NVIDIA GB200", date="2027-01-01"))
    cost = step_cost_for_gpu("H100", tmp_path)
    assert cost.measured and cost.seconds == pytest.approx(2.0e-3)  # the mean over the two models
    assert "_old.json" not in cost.text and "_dsv2.json" in cost.text and "_qwen.json" in cost.text
    assert not step_cost_for_gpu("B200", tmp_path).measured  # GB200's file is not a B200's
    assert step_cost_for_gpu("GB200", tmp_path).measured
