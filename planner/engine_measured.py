"""moelink's own engine, measured: the decode steps `benchmarks/engine_decode.py` timed on a GPU.

benchmarks/results/engine_decode_<device>.json holds whole decode steps of moelink's model runner (CUDA
graph replay, Triton kernels) for one model shape at several batch sizes. Two uses:

- fit: the per-layer fixed cost of moelink's small kernels (norms, rotary, routing, activation, residual:
  launch-bound inside a graph) is what the batch-1 step has left after the roofline terms; it replaces
  the published engines' 120 us in the `moelink` engine profile (`engines.get_engine`);
- check: with that one number, the model must predict the other batch sizes it never saw
  (`moelink plan --calibrate` prints the table; a test bounds the error).

The benchmark builds fewer layers than the model has when memory is short ("layers"): times are compared
per layer, the LM head ("head_ms") apart.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .efficiency import Efficiency
from .hardware import get_profile
from .imbalance import Balance
from .kernels import RESULTS_DIR, load_moe_measurements
from .models import MODELS
from .step_model import Precision, Setup, decode_step

BF16 = Precision(experts="bf16", dense="bf16", attention="bf16", dispatch="bf16")
# The GPU the measurement ran on, as the planner's hardware profile names it.
_PROFILE_FOR_DEVICE = (("H100", "h100-hgx"), ("H200", "h200-hgx"), ("B200", "b200-hgx"))


@dataclass(frozen=True)
class DecodePoint:
    """One measured decode step: per-layer seconds (graph replay, LM head excluded)."""

    device: str
    model: str
    batch: int
    context: int
    per_layer_s: float
    source: str


def _model_name(text: str) -> str | None:
    name = text.split(" shape")[0].split(",")[0].strip().lower()
    return name if name in MODELS else None


@functools.lru_cache(maxsize=8)
def load_engine_decode(results_dir: Path = RESULTS_DIR) -> tuple[DecodePoint, ...]:
    """Every usable point of results_dir/engine_decode_*.json; unreadable files and rows are skipped."""
    out = []
    for path in sorted(Path(results_dir).glob("engine_decode_*.json")):
        try:
            data = json.loads(path.read_text())
            model = _model_name(str(data.get("model", "")))
            device = str(data["device"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if model is None:
            continue
        for row in data.get("results", []):
            try:
                per_layer = (float(row["graph_step_ms"]) - float(row["head_ms"])) / int(row["layers"]) * 1e-3
                out.append(DecodePoint(device, model, int(row["batch"]), int(row["context"]), per_layer, path.name))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                continue
    return tuple(out)


def _profile(device: str) -> str | None:
    return next((p for key, p in _PROFILE_FOR_DEVICE if re.search(rf"\b{key}", device)), None)


def predicted_per_layer(point: DecodePoint, eff: Efficiency) -> float:
    """The model's per-layer seconds for a measured point (moelink's measured MoE kernel on that GPU)."""
    model, hw = MODELS[point.model], get_profile(_profile(point.device))
    measured = tuple(m for m in load_moe_measurements(point.device.split()[1] if " " in point.device else "")
                     if (m.num_experts, m.hidden, m.inter, m.dtype) ==
                     (model.num_experts, model.hidden, model.moe_intermediate, "bf16"))
    setup = Setup(ep=1, batch_per_rank=point.batch, context_len=point.context, precision=BF16, overlap="none",
                  balance=Balance("perfect"), measured=measured)
    res = decode_step(model, hw, setup, eff)
    return (res.seconds - res.breakdown["lm_head"] - res.breakdown["step_overhead"]) / model.num_layers


def fit_layer_overhead(base: Efficiency, points: tuple[DecodePoint, ...] | None = None) -> float | None:
    """moelink's per-layer fixed cost: per measured series (a device's run of a model: one results file), the
    smallest batch's measured per-layer time minus the model's per-layer time without its fixed cost (>= 0); the
    mean over series (two sessions' runs on one kind of GPU count as two).
    None without a usable measurement."""
    pts = [p for p in (points if points is not None else load_engine_decode()) if _profile(p.device)]
    if not pts:
        return None
    # One fit per measured series (device, model, file), from its smallest batch; the mean over series.
    series: dict[tuple[str, str, str], DecodePoint] = {}
    for p in pts:
        key = (p.device, p.model, p.source)
        if key not in series or p.batch < series[key].batch:
            series[key] = p
    fits = [max(0.0, p.per_layer_s - (predicted_per_layer(p, base) - base.layer_overhead_s))
            for p in series.values()]
    return sum(fits) / len(fits)


def check(eff: Efficiency) -> list[dict]:
    """Measured vs predicted per-layer decode time of moelink's engine, every measured batch."""
    rows = []
    for p in load_engine_decode():
        if not _profile(p.device):
            continue
        pred = predicted_per_layer(p, eff)
        rows.append({"device": p.device, "model": p.model, "batch": p.batch, "measured_us": p.per_layer_s * 1e6,
                     "predicted_us": pred * 1e6, "error": pred / p.per_layer_s - 1.0, "source": p.source})
    return rows


def with_measured_overhead(eff: Efficiency) -> Efficiency:
    """`eff` with moelink's fitted per-layer fixed cost when a measurement exists."""
    fitted = fit_layer_overhead(eff)
    return eff if fitted is None else replace(eff, layer_overhead_s=fitted)
