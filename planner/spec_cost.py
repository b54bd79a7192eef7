"""moelink's speculative (MTP) decode steps, priced from what was measured of its engine.

The step model prices a speculative decode step's device work the same for every engine: 1 + k query tokens per
sequence through every layer, plus k draft forwards (one decoder layer and the LM head each). What moelink adds
on top is how it runs them (engine/spec/verify.py, engine/spec/proposer/mtp.py, engine/rank/cuda_graph.py):
- the drafter's k forwards run eagerly (kernel by kernel from the host), on every rank;
- a verify step replays a CUDA graph (every row 1 + k tokens; under expert parallelism in the low-latency mode,
  whose default capacity holds max_num_seqs x (1 + k) tokens), priced as the step model prices any graph step;
- speculative steps run the serial step loop, so the host's work per sequence is not hidden behind the device.

Two measured numbers price those (`spec_cost`):
- `eager_layer_s`, what one decoder layer costs eagerly over its graph replay: benchmarks/engine_decode.py's
  rows (benchmarks/results/engine_decode_<GPU>.json: `step_ms` eager, `graph_step_ms` replayed, the same model,
  batch and layers), (step - graph step) / layers, the mean over the rows measured on the GPU asked for (any GPU's
  when none was, saying so);
- `host_s_per_seq`, the serial loop's host work per sequence and step: benchmarks/host_overhead.py
  (host_overhead_*.json, `step_loop.cpu_host_only_us_per_seq.async_off`, the engine thread's CPU time less its
  device work), the newest file.
Each falls back to a documented constant when no result holds it, and the text says which.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .efficiency import SpecCost
from .kernels import RESULTS_DIR

# Fallbacks: the H100 measurement of 2026-11-22 (engine_decode, Qwen3-30B-A3B shape, 40 layers: 0.85 ms per
# layer eager over graph) and the CPU host-time measurement of 2026-11-23 (4.9 us per sequence, serial loop).
FALLBACK_EAGER_LAYER_S = 0.85e-3
FALLBACK_HOST_S_PER_SEQ = 4.9e-6


def _json_files(results_dir: Path, pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(results_dir.glob(pattern)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append((path, data))
    return out


def _eager_rows(data: dict) -> list[float]:
    """Per-layer seconds eager over graph, one per usable row of an engine_decode result."""
    out = []
    for row in data.get("results", []) if isinstance(data.get("results"), list) else []:
        try:
            step, graph, layers = float(row["step_ms"]), float(row["graph_step_ms"]), int(row["layers"])
        except (KeyError, TypeError, ValueError):
            continue
        if layers > 0 and math.isfinite(step) and math.isfinite(graph) and step >= graph:
            out.append((step - graph) / layers * 1e-3)
    return out


def eager_layer_cost(gpu: str | None, results_dir: Path) -> tuple[float, str]:
    """(seconds per layer, where from): the engine_decode rows measured on `gpu`'s family, else any GPU's."""
    family = (gpu or "").split("-")[0]
    found = [(p, str(d.get("device", "")), _eager_rows(d)) for p, d in _json_files(results_dir, "engine_decode_*.json")]
    found = [f for f in found if f[2]]
    same = [f for f in found if family and re.search(rf"\b{re.escape(family)}\b", f[1])]
    use = same or found
    if not use:
        return FALLBACK_EAGER_LAYER_S, (f"{FALLBACK_EAGER_LAYER_S * 1e3:.2f} ms per layer eager over graph "
                                        "(assumed: no engine_decode result)")
    xs = [x for _, _, rows in use for x in rows]
    where = ", ".join(sorted({p.name for p, _, _ in use}))
    note = "" if same else f", measured on another GPU than {family or 'the one asked'}"
    return sum(xs) / len(xs), f"{sum(xs) / len(xs) * 1e3:.2f} ms per layer eager over graph ({where}{note})"


def host_cost(results_dir: Path) -> tuple[float, str]:
    """(seconds per sequence, where from): the serial loop's host work of the newest host_overhead result."""
    best = None
    for path, data in _json_files(results_dir, "host_overhead_*.json"):
        try:
            us = float(data["step_loop"]["cpu_host_only_us_per_seq"]["async_off"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(us) and us >= 0 and (best is None or str(data.get("date", "")) > best[2]):
            best = (us * 1e-6, path.name, str(data.get("date", "")), str(data.get("device", "?")))
    if best is None:
        return FALLBACK_HOST_S_PER_SEQ, (f"{FALLBACK_HOST_S_PER_SEQ * 1e6:.1f} us host work per sequence "
                                         "(assumed: no host_overhead result)")
    return best[0], f"{best[0] * 1e6:.1f} us host work per sequence, serial loop ({best[1]}, {best[3]} host)"


def spec_cost(gpu: str | None, results_dir: Path | None = None) -> SpecCost:
    """moelink's SpecCost on `gpu` (a hardware profile's GPU name or family), from benchmarks/results."""
    results_dir = Path(RESULTS_DIR if results_dir is None else results_dir)
    layer, layer_text = eager_layer_cost(gpu, results_dir)
    host, host_text = host_cost(results_dir)
    return SpecCost(layer, host, f"{layer_text}; {host_text}")
