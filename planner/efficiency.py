"""The one set of efficiency constants the cluster model uses for every GPU, model and setup.

Each is a fraction of a measured hardware ceiling (or a fixed cost) that real
serving kernels reach, chosen from measurements of the kernels these systems
run — never fitted per calibration row. Link efficiency lives with the links
(`moelink.comm.link_model.LINK_EFFICIENCY`, 0.8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SpecCost:
    """What an engine's speculative (MTP) steps cost beyond the step model's device work: the drafts' forwards
    run eagerly (`eager_layer_s` per draft: one layer launched from the host, over its graph replay) and the
    serial loop's host work (`host_s_per_seq` per sequence and step). planner/spec_cost.py measures moelink's."""

    eager_layer_s: float
    host_s_per_seq: float
    text: str  # where both came from, one sentence for `moelink plan`

    def __post_init__(self) -> None:
        for name in ("eager_layer_s", "host_s_per_seq"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"SpecCost {name}={v!r} must be a finite number >= 0.")

    def extra(self, mtp_draft: int, batch_per_rank: int) -> dict[str, float]:
        """Seconds a speculative decode step of `batch_per_rank` sequences adds, by cause."""
        return {"spec_host": self.host_s_per_seq * batch_per_rank, "spec_eager_drafts": self.eager_layer_s * mtp_draft}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the *measured* ceilings of `hardware.GpuSpec` (large-matmul TFLOP/s,
    copy bandwidth), and fixed costs.

    gemm: tensor-core GEMMs (projections, dense FFN, grouped expert GEMMs) at full tiles.
        DeepGEMM reaches 1,297-1,550 FP8 TFLOP/s on H800 in isolation, 0.8-0.95 of the measured
        ceiling (0.81 x 1,979). Inside a serving step clocks drop under power limits, FP8 block
        scales and ragged expert groups cost more: 0.61 (0.49 of datasheet on Hopper), the value
        `calibration.fit_gemm_efficiency` fits on the single-node calibration rows (no NIC on their
        path, so network errors cannot hide inside it); a test keeps the two equal.
    attention: attention math. FlashMLA decode peaks at ~660 BF16 TFLOP/s on H800 (0.82 of the
        measured ceiling) on its best shapes; paged, ragged batches with rotary/softmax overhead
        land near 0.5 of the ceiling.
    memory: HBM streams (weights, KV, activations) in kernels that also compute: 0.9 of the
        measured copy bandwidth (0.8 of datasheet on Hopper).
    overlap_sm / overlap_rdma: fraction of the shorter of (compute, communication) that
        two-micro-batch overlap hides, when the all-to-all kernels occupy SMs (NCCL, DeepEP normal
        mode: ~20 of 132 SMs copy while the GEMMs run) and when they only post RDMA writes and
        free the SMs (DeepEP low-latency, DeepSeek's decode). Set from SGLang's TBO ablation on
        96 H100 (LMSYS large-scale-EP blog), not from the throughput rows: prefill +27-35% -> 0.5;
        decode +25.5% at 256 tokens/GPU -> 0.75. The rest is lost to micro-batch imbalance and
        busy-waiting.
    layer_overhead_s: per decoder layer, time of the ~30 small kernels (norms, rotary, routing,
        quantization, activation, residual) that is latency- not bandwidth-bound: ~4 us each
        inside a CUDA graph -> 120 us.
    step_overhead_s: per forward step: sampling, scheduler hand-off and graph launch not hidden
        by CPU/GPU overlap, ~2 ms (SGLang/vLLM step traces at large batch).
    spec: how an engine runs speculative (MTP) steps beyond the step model's device work
        (planner/spec_cost.SpecCost: eager draft forwards, eager verify steps under EP, the serial loop's host
        work); None: as the published engines do (graphed and overlapped), nothing beyond it.
    activation_passes: reads+writes of a token's hidden vector (bf16) per layer by the small
        kernels above, beyond the GEMMs' own traffic.
    tile_m: row tile of grouped GEMMs (Hopper wgmma / DeepGEMM BLOCK_M = 64): each expert's
        rows are padded up to it.
    """

    gemm: float = 0.61
    attention: float = 0.5
    memory: float = 0.9
    overlap_sm: float = 0.5
    overlap_rdma: float = 0.75
    layer_overhead_s: float = 120e-6
    step_overhead_s: float = 2e-3
    activation_passes: int = 20
    tile_m: int = 64
    spec: SpecCost | None = None

    def __post_init__(self) -> None:
        for name in ("gemm", "attention", "memory", "overlap_sm", "overlap_rdma"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Efficiency {name}={v} must be in (0, 1].")
        if self.layer_overhead_s < 0 or self.step_overhead_s < 0:
            raise ValueError("Efficiency overheads must be >= 0.")
        if self.activation_passes < 0 or self.tile_m < 1:
            raise ValueError("Efficiency activation_passes must be >= 0 and tile_m >= 1.")


DEFAULT_EFFICIENCY = Efficiency()
