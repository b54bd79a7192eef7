"""moelink's fixed cost per engine step, measured: what `benchmarks/engine_e2e.py` found on a GPU.

The step model prices the device's work; a real engine step also costs what the host adds on top (scheduling,
input preparation, the sampling hand-off, outputs) that the device does not hide. engine_e2e measures it
directly: each decode-heavy `LLM.generate` row records `exposed_ms_per_step`, its median full-batch step's
wall time minus the CUDA-graph step of the same model, dtype and batch.

The rule (`fixed_step_cost`): the rows of the decode-heavy workload without an error, in the engine's default
loop (async scheduling on, or the only loop an engine without the switch has), bf16 (any dtype when there is
no bf16 row); per model the largest batch (the planner plans large batches; rows at that batch averaged); the
mean over models, at least 0. The result read (`step_cost_for_gpu`): of the engine_e2e_*.json files measured
on the GPU that hold such a row, those of the newest date (one GPU session writes several: per model and
dtype, quick), pooled.

Fallback: `Efficiency.step_overhead_s` (2.0 ms, the published engines' step traces) when no file for the GPU
has a usable row; the text says which source was used, and why.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .efficiency import DEFAULT_EFFICIENCY
from .kernels import RESULTS_DIR

PATTERN = "engine_e2e_*.json"
FALLBACK_S = DEFAULT_EFFICIENCY.step_overhead_s


@dataclass(frozen=True)
class StepCost:
    """The fixed cost per step the moelink profile uses on one GPU, and where it came from."""

    seconds: float
    measured: bool
    text: str  # one sentence for `moelink plan`'s output


def _usable(r) -> bool:
    if not isinstance(r, dict):
        return False
    x = r.get("exposed_ms_per_step")
    return (r.get("part") == "generate" and r.get("workload") == "decode" and not r.get("error")
            and r.get("async_scheduling") in (True, None) and isinstance(x, (int, float))
            and not isinstance(x, bool) and math.isfinite(x) and isinstance(r.get("batch"), int))


def fixed_step_cost(result: dict) -> tuple[float, str]:
    """(milliseconds, what they were taken from) by the rule above; ValueError, naming what is missing, when the
    result holds no usable row."""
    if not isinstance(result, dict) or result.get("benchmark") != "engine_e2e":
        raise ValueError("not an engine_e2e result (its 'benchmark' field is not 'engine_e2e')")
    rows = result.get("rows")
    if not isinstance(rows, list):
        raise ValueError("it has no 'rows' list")
    ok = [r for r in rows if _usable(r)]
    ok = [r for r in ok if r.get("dtype") == "bf16"] or ok
    if not ok:
        raise ValueError("it has no decode-heavy row of the default loop (async scheduling on) with "
                         "exposed_ms_per_step and no error")
    top: dict[str, int] = {}
    for r in ok:
        m = str(r.get("model"))
        top[m] = max(top.get(m, 0), r["batch"])
    per_model = {}
    for m, b in top.items():
        xs = [max(0.0, float(r["exposed_ms_per_step"])) for r in ok if str(r.get("model")) == m and r["batch"] == b]
        per_model[m] = sum(xs) / len(xs)
    ms = sum(per_model.values()) / len(per_model)
    dtypes = sorted({str(r.get("dtype")) for r in ok})
    what = ", ".join(f"{m} batch {top[m]}: {v:.2f} ms" for m, v in sorted(per_model.items()))
    return ms, f"decode-heavy LLM.generate step minus its CUDA-graph step, {'/'.join(dtypes)} ({what})"


def _device_matches(device: str, gpu: str) -> bool:
    return bool(re.search(rf"\b{re.escape(gpu)}\b", device))


def step_cost_for_gpu(gpu: str | None, results_dir: Path | None = None) -> StepCost:
    """The fixed cost per step on `gpu` (a hardware profile's GPU name or its family: "H100-SXM", "H100"): from
    the newest engine_e2e results measured on it (in results_dir, default benchmarks/results), else the
    documented constant, saying why."""
    results_dir = Path(RESULTS_DIR if results_dir is None else results_dir)
    where = "benchmarks/results" if results_dir == Path(RESULTS_DIR) else str(results_dir)
    fallback = f"{FALLBACK_S * 1e3:.1f} ms assumed (published engines' step traces)"
    if not gpu:
        return StepCost(FALLBACK_S, False, fallback)
    family = gpu.split("-")[0]
    usable, problems = [], []
    for path in sorted(results_dir.glob(PATTERN)):
        try:
            data = json.loads(path.read_text())
            device = data["device"]
            if not isinstance(device, str):
                raise TypeError("'device' is not a string")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name} is unreadable ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if not _device_matches(device, family):
            continue
        try:
            fixed_step_cost(data)
        except ValueError as exc:
            problems.append(f"{path.name} is unusable: {exc}")
            continue
        usable.append((str(data.get("date", "")), path, data))
    if not usable:
        why = f"no {PATTERN} result measured on {family} in {where} has a usable row"
        if problems:
            why += f" ({'; '.join(problems)})"
        return StepCost(FALLBACK_S, False, f"{fallback}: {why}")
    date = max(d for d, _, _ in usable)
    newest = [(p, data) for d, p, data in usable if d == date]
    pooled = dict(benchmark="engine_e2e", rows=[r for _, data in newest for r in data["rows"]])
    ms, what = fixed_step_cost(pooled)
    files = ", ".join(p.name for p, _ in newest)
    commits = ", ".join(sorted({str(data.get("commit", "?")) for _, data in newest}))
    return StepCost(ms * 1e-3, True, f"{ms:.2f} ms measured by benchmarks/engine_e2e.py on {newest[0][1]['device']} "
                                     f"({files}; {date or 'undated'}, commit {commits}): {what}")
