"""Kernel times: roofline GEMMs, grouped expert GEMMs, and measured MoE timings when we have them.

Roofline: time = max(FLOPs / (ceiling * eff.gemm), bytes / (copy bandwidth * eff.memory)),
with the measured ceilings of `hardware.GpuSpec`.
A grouped expert GEMM pads each expert's rows to the row tile, and touches only
the weights of experts that received at least one row.

Measurements: when `benchmarks/results/moe_kernels*.json` (written by
`benchmarks/moe_kernels.py` on a GPU) holds the expert computation for the same
expert shape on the same GPU, `MeasuredMoE` replaces the roofline for it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .efficiency import Efficiency
from .hardware import GpuSpec
from .weight_bytes import bytes_per_weight

# Per weight of large matrices, as the engine counts them (weight_bytes.py): FP8 is 1 byte + a float32 scale
# per 128 x 128 block, NVFP4 half a byte + an FP8 scale per 16.
WEIGHT_BYTES = {fmt: bytes_per_weight(fmt) for fmt in ("bf16", "fp8", "nvfp4")}
ACT_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 1.0}  # activations of FP4 GEMMs arrive as FP8/FP4 (~1 B)
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def compute_dtype(gpu: GpuSpec, weight_dtype: str) -> str:
    """Tensor-core dtype a GEMM with these weights runs in (FP4 weights run as FP8 without FP4 units)."""
    return weight_dtype if weight_dtype in gpu.tflops else "fp8"


def roofline(flops: float, bytes_moved: float, gpu: GpuSpec, dtype: str, eff: Efficiency,
             compute_eff: float | None = None) -> float:
    """Seconds for a kernel doing `flops` in `dtype` and moving `bytes_moved` through HBM."""
    t_compute = flops / (gpu.ceiling_flops(dtype) * (compute_eff or eff.gemm))
    t_memory = bytes_moved / (gpu.ceiling_hbm_bytes_per_s * eff.memory)
    return max(t_compute, t_memory)


def gemm_time(m: float, params: float, io_elems_per_row: float, gpu: GpuSpec, weight_dtype: str,
              eff: Efficiency) -> float:
    """A dense GEMM (or a chain of them) of `m` token rows against `params` weights: 2*m*params FLOPs.

    Traffic: the weights once, plus `io_elems_per_row` bf16 activation elements
    read or written per row (inputs and outputs of the chain).
    """
    if m <= 0:
        return 0.0
    bytes_moved = params * WEIGHT_BYTES[weight_dtype] + 2.0 * m * io_elems_per_row
    return roofline(2.0 * m * params, bytes_moved, gpu, compute_dtype(gpu, weight_dtype), eff)


def grouped_expert_time(pairs: float, experts: float, hidden: int, inter: int, gpu: GpuSpec,
                        weight_dtype: str, eff: Efficiency) -> float:
    """Gate-up + down GEMMs for `pairs` (token, expert) rows spread over `experts` local experts.

    Rows per expert m = pairs / experts, padded up to eff.tile_m (the kernel's M tile).
    Experts with no row are skipped: with Poisson arrivals an expert is idle with
    probability exp(-m), so the weights read are experts * (1 - exp(-m)) * 3*H*I.
    """
    if pairs <= 0 or experts <= 0:
        return 0.0
    m = pairs / experts
    m_padded = math.ceil(m / eff.tile_m) * eff.tile_m
    active = experts * (1.0 - math.exp(-m))
    params = 3.0 * hidden * inter
    flops = 2.0 * experts * m_padded * params
    act_bytes = pairs * (hidden * ACT_BYTES[weight_dtype] + 2 * inter * 2 + inter * ACT_BYTES[weight_dtype]
                         + hidden * 2)
    bytes_moved = active * params * WEIGHT_BYTES[weight_dtype] + act_bytes
    return roofline(flops, bytes_moved, gpu, compute_dtype(gpu, weight_dtype), eff)


@dataclass(frozen=True)
class MeasuredMoE:
    """Measured whole-MoE times (align -> GEMM1 -> act -> GEMM2 -> combine) on one GPU.

    points: (tokens, seconds) for all `num_experts` experts of the layer on that GPU, top_k each.
    """

    device: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: str
    points: tuple[tuple[float, float], ...]

    def time(self, pairs: float, experts: float) -> float:
        """Seconds for `pairs` rows over `experts` local experts, by equal rows per expert.

        The benchmark ran T tokens over E experts (T*k/E rows per expert); we look up
        the T giving the same rows per expert (log-log interpolation) and scale by
        the fraction of experts we hold.
        """
        rows = pairs / max(experts, 1e-9)
        t_equiv = rows * self.num_experts / self.top_k
        xs = [math.log(max(p[0], 1e-9)) for p in self.points]
        ys = [math.log(max(p[1], 1e-12)) for p in self.points]
        x = math.log(max(t_equiv, 1e-9))
        if x <= xs[0]:
            y = ys[0]
        elif x >= xs[-1]:  # beyond the last point: extrapolate linearly in tokens (compute-bound)
            y = ys[-1] + (x - xs[-1])
        else:
            i = next(j for j in range(1, len(xs)) if xs[j] >= x)
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            y = ys[i - 1] + f * (ys[i] - ys[i - 1])
        return math.exp(y) * experts / self.num_experts


def _first(row: dict, *keys, default=None):
    for k in keys:
        if k in row:
            return row[k]
    return default


def load_moe_measurements(device_substring: str, results_dir: Path | None = None) -> list[MeasuredMoE]:
    """All moelink MoE timings in results_dir/moe_kernels*.json measured on a device whose name has a word
    starting with `device_substring` (e.g. "H100" matches "NVIDIA H100 80GB HBM3", "B200" not "GB200"). Missing directory or files give []; unreadable rows are skipped.

    Schema read (tolerant of the spelling variants below): top level "device_name"; "rows" with a
    shape ("shape": {E/num_experts, top_k, H/hidden, I/intermediate}), "tokens", a system name
    ("system"/"impl", moelink rows only) and a time ("median_ms"/"median_us"/"time_ms"); "dtype".
    """
    out: list[MeasuredMoE] = []
    for path in sorted((results_dir or RESULTS_DIR).glob("moe_kernels*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = str(data.get("device_name") or data.get("device") or "")
        # Word-start match so that "B200" does not pick up "GB200" files.
        if not re.search(rf"\b{re.escape(device_substring)}", device, re.IGNORECASE):
            continue
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for row in data.get("rows", []):
            system = str(_first(row, "system", "impl", default="moelink")).lower()
            if not (system.startswith("moelink") or system == "triton"):
                continue
            shape = row.get("shape", row)
            try:
                key = (int(_first(shape, "E", "num_experts")), int(_first(shape, "top_k", "topk")),
                       int(_first(shape, "H", "hidden")), int(_first(shape, "I", "intermediate")),
                       str(_first(row, "dtype", default=data.get("dtype", "bf16"))))
                tokens = float(_first(row, "tokens", "num_tokens"))
                if "median_us" in row:
                    sec = float(row["median_us"]) * 1e-6
                else:
                    sec = float(_first(row, "median_ms", "time_ms")) * 1e-3
            except (TypeError, ValueError):
                continue
            groups.setdefault(key, []).append((tokens, sec))
        for (e, k, h, i, dt), pts in groups.items():
            out.append(MeasuredMoE(device, e, k, h, i, dt, tuple(sorted(pts))))
    return out


def find_measurement(measurements: list[MeasuredMoE], num_experts: int, top_k: int, hidden: int, inter: int,
                     dtype: str) -> MeasuredMoE | None:
    """The measurement of exactly this expert shape and dtype, if any."""
    for m in measurements:
        if (m.num_experts, m.top_k, m.hidden, m.inter, m.dtype) == (num_experts, top_k, hidden, inter, dtype):
            return m
    return None
