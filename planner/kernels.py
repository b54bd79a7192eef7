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

import functools
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
# INT4 (W4A16, Kimi's group-32 bf16 scales): half a byte + 2 / 32, 0.5625 byte a weight.
# MXFP4 (OCP, an e8m0 scale per 32): 0.53125 byte a weight.
WEIGHT_BYTES = {fmt: bytes_per_weight(fmt) for fmt in ("bf16", "fp8", "nvfp4", "int4", "mxfp4")}
ACT_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 1.0, "int4": 2.0, "mxfp4": 2.0}  # FP4 GEMMs' activations arrive as
# FP8/FP4 (~1 B); INT4 and MXFP4 run W4A16: bf16 activations
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def compute_dtype(gpu: GpuSpec, weight_dtype: str) -> str:
    """Tensor-core dtype a GEMM with these weights runs in (FP4 weights run as FP8 without FP4 units; INT4 W4A16
    and MXFP4 W4A16 weights are dequantized into bf16 MMAs)."""
    if weight_dtype in ("int4", "mxfp4"):
        return "bf16"
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
    memory_frac / matmul_frac: the kernel's achieved fractions of that GPU's *measured* copy bandwidth
    (best of the memory-bound points, <= 64 tokens) and large-matmul TFLOP/s in `dtype` (best point):
    what `moelink plan --engine moelink` carries to GPUs we have not measured. None when the file
    does not state them.
    """

    device: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: str
    points: tuple[tuple[float, float], ...]
    memory_frac: float | None = None
    matmul_frac: float | None = None
    source: str = ""

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
        if k in row and row[k] is not None:
            return row[k]
    return default


_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float8_e4m3fn": "fp8", "fp8": "fp8", "nvfp4": "nvfp4"}
# System names of moelink's own MoE kernels, best first: the benchmark's default Triton path, its
# atomic-combine variant, and the precision comparison files' per-dtype rows ("bf16"/"fp8").
_MOELINK_SYSTEMS = ("moelink-triton", "moelink", "triton", "bf16", "fp8", "moelink-triton-atomic")


def _row_dtype(system: str, row: dict, file_dtype: str) -> str | None:
    """dtype of a moelink row: the precision files name the dtype as the system; others carry it."""
    if system in ("bf16", "fp8"):
        return system
    return _DTYPE_NAMES.get(str(_first(row, "dtype", default=file_dtype)).lower())


def _row_key(row: dict, file_dtype: str) -> tuple | None:
    shape = row["shape"] if isinstance(row.get("shape"), dict) else row
    system = str(_first(row, "system", "impl", default="moelink")).lower()
    if system not in _MOELINK_SYSTEMS:
        return None
    dtype = _row_dtype(system, row, file_dtype)
    try:
        key = (int(_first(shape, "E", "num_experts")), int(_first(shape, "K", "top_k", "topk")),
               int(_first(shape, "D", "H", "hidden")), int(_first(shape, "I", "intermediate")), dtype, system)
    except (TypeError, ValueError):
        return None
    return key if dtype else None


def _row_seconds(row: dict) -> float | None:
    try:
        if row.get("median_us") is not None:
            return float(row["median_us"]) * 1e-6
        return float(_first(row, "median_ms", "time_ms")) * 1e-3
    except (TypeError, ValueError):
        return None


def _fractions(rows: list[dict], dtype: str) -> tuple[float | None, float | None]:
    """Best achieved fraction of copy bandwidth at <= 64 tokens and of the matmul ceiling in `dtype`."""
    mem = [float(r["frac_copy_bw"]) for r in rows if r.get("frac_copy_bw") is not None and r["tokens"] <= 64]
    mm = []
    for r in rows:
        if r.get("frac_matmul") is not None:
            mm.append(float(r["frac_matmul"]) / (2.0 if dtype == "fp8" else 1.0))
        elif r.get("frac_matmul_bf16") is not None:  # the precision files state it against the BF16 ceiling
            mm.append(float(r["frac_matmul_bf16"]) / (2.0 if dtype == "fp8" else 1.0))
    return (min(1.0, max(mem)) if mem else None), (min(1.0, max(mm)) if mm else None)


def load_moe_measurements(device_substring: str, results_dir: Path | None = None) -> list[MeasuredMoE]:
    """See `_load` (read once per directory and device name; the planner asks for them per layout)."""
    return list(_load(device_substring, Path(results_dir or RESULTS_DIR)))


@functools.lru_cache(maxsize=64)
def _load(device_substring: str, results_dir: Path) -> tuple[MeasuredMoE, ...]:
    """moelink's MoE timings from results_dir/moe_kernels*.json measured on a device whose name has a word
    starting with `device_substring` ("H100" matches "NVIDIA H100 80GB HBM3"; "B200" not "GB200"; "" any).

    Schema (benchmarks/moe_kernels.py): top level "device" (or "device_name"), "dtype" ("bfloat16", "fp8"),
    "results" (or "rows"): {"shape": name or {E, top_k, H, I}, "E", "K", "D", "I", "tokens", "system",
    "median_ms" (or "median_us"/"time_ms"), "frac_copy_bw", "frac_matmul" (or "frac_matmul_bf16")}.
    Only moelink's own kernels count ("moelink-triton" and its variants; "bf16"/"fp8" in the precision
    files); torch and per-expert-loop baselines are skipped. Several files may measure the same shape and
    dtype (a tuning run, a check run, the per-shape run): the series with the most token counts wins, then
    the preferred system (the default Triton path before the atomic variant), then the later file name.
    Missing directory or files give []; unreadable files and rows are skipped."""
    series: dict[tuple, tuple] = {}
    for path in sorted(results_dir.glob("moe_kernels*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        device = str(data.get("device_name") or data.get("device") or "")
        # Word-start match so that "B200" does not pick up "GB200" files.
        if not re.search(rf"\b{re.escape(device_substring)}", device, re.IGNORECASE):
            continue
        file_dtype = str(data.get("dtype", "bf16")).lower()
        groups: dict[tuple, list[dict]] = {}
        for row in data.get("results", data.get("rows", [])):
            if not isinstance(row, dict):
                continue
            key, sec = _row_key(row, file_dtype), _row_seconds(row)
            try:
                tokens = float(_first(row, "tokens", "num_tokens"))
            except (TypeError, ValueError):
                continue
            if key is None or sec is None or tokens <= 0:
                continue
            groups.setdefault(key, []).append({**row, "tokens": tokens, "_sec": sec})
        for (e, k, h, i, dt, system), rows in groups.items():
            pts = tuple(sorted({r["tokens"]: r["_sec"] for r in rows}.items()))
            mem, mm = _fractions(rows, dt)
            meas = MeasuredMoE(device, e, k, h, i, dt, pts, mem, mm, path.name)
            rank = (len(pts), -_MOELINK_SYSTEMS.index(system))
            best = series.get((device, e, k, h, i, dt))
            if best is None or rank >= best[0]:
                series[(device, e, k, h, i, dt)] = (rank, meas)
    return tuple(m for _, m in series.values())


def measured_efficiency(measurements: list[MeasuredMoE], dtype: str, shape: tuple | None = None
                        ) -> tuple[float, float, str] | None:
    """(matmul fraction, memory fraction, where from) of moelink's grouped expert kernel in `dtype`:
    of the measurement of this exact (E, top_k, H, I) shape when there is one, else the mean over the
    measured shapes in that dtype; None without any."""
    pool = [m for m in measurements if m.dtype == dtype and m.matmul_frac and m.memory_frac]
    exact = [m for m in pool if shape and (m.num_experts, m.top_k, m.hidden, m.inter) == tuple(shape)]
    use = exact or pool
    if not use:
        return None
    mm = sum(m.matmul_frac or 0.0 for m in use) / len(use)  # (set in every one: `pool` keeps those)
    mem = sum(m.memory_frac or 0.0 for m in use) / len(use)
    return mm, mem, ", ".join(sorted({m.source for m in use}))


def find_measurement(measurements: list[MeasuredMoE], num_experts: int, top_k: int, hidden: int, inter: int,
                     dtype: str) -> MeasuredMoE | None:
    """The measurement of exactly this expert shape and dtype, if any."""
    for m in measurements:
        if (m.num_experts, m.top_k, m.hidden, m.inter, m.dtype) == (num_experts, top_k, hidden, inter, dtype):
            return m
    return None
