"""Engine profiles: which serving engine the cluster model describes (`moelink plan --engine`).

The step model is physics (bytes, FLOPs, links); what differs between engines is which modes exist
(all-to-all patterns, overlap, precisions, speculative decoding, TP attention) and how close their
kernels come to the hardware. Two profiles:

- `moelink`: only what this repository has. Routed-expert kernels from moelink's own GPU measurements
  under benchmarks/results/ (`kernels.load_moe_measurements`): the measured times on the measured GPU,
  and the measured fractions of the copy/matmul ceilings carried to other GPUs; documented assumptions
  (the `published` constants) for everything not measured. Overlap is two-batch overlap over NCCL-style
  all-to-all kernels that occupy SMs, so it hides `overlap_sm` of the shorter side, never the RDMA-only
  `overlap_rdma` of DeepEP's low-latency kernels.
- `published`: the engines of the calibration table (DeepSeek's, SGLang, TensorRT-LLM): every mode, and
  the efficiency constants fixed from their published kernels and ablations. Calibration and validation
  rows are predicted with it.

Every prediction prints the profile's features with their status, so a reader sees which parts of a
moelink number stand on code that exists and was timed on a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from .efficiency import DEFAULT_EFFICIENCY, Efficiency
from .spec_cost import FALLBACK_EAGER_LAYER_S, FALLBACK_HOST_S_PER_SEQ, SpecCost, spec_cost

BUILT_MEASURED = "built, GPU-measured"
BUILT = "built, not GPU-measured"
NOT_BUILT = "not built"
STATUSES = (BUILT_MEASURED, BUILT, NOT_BUILT)


@dataclass(frozen=True)
class Feature:
    """One engine capability a prediction may lean on. status: one of STATUSES."""

    name: str
    status: str
    evidence: str = ""
    tag: str = ""  # what a plan uses it for (see plan.features_used); "" = every plan

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"feature {self.name!r}: status={self.status!r} must be one of {', '.join(STATUSES)}.")


@dataclass(frozen=True)
class EngineProfile:
    """What an engine can run. patterns: all-to-all patterns (comm.link_model.Pattern values) it has;
    precisions: planner precision names (plan.PRECISIONS) it serves; measured_kernels: take routed-expert
    kernels from benchmarks/results/ measurements; mtp / tp_attention: has multi-token prediction /
    tensor-parallel attention."""

    name: str
    description: str
    efficiency: Efficiency
    patterns: tuple[str, ...]
    precisions: tuple[str, ...]
    measured_kernels: bool
    mtp: bool
    tp_attention: bool
    features: tuple[Feature, ...] = ()
    # efficiency.step_overhead_s and where it came from, in words
    step_cost_note: str = f"{DEFAULT_EFFICIENCY.step_overhead_s * 1e3:.1f} ms assumed (published engines' step traces)"

    def check(self, *, precision: str, pattern: str, mtp_draft: int, attn_tp: int) -> None:
        """One clear error when a plan asks this engine for a mode it does not have."""
        alt = " (or --engine published for what published engines run)" if self.name != "published" else ""
        if precision not in self.precisions:
            raise ValueError(f"precision={precision!r} is not available in engine {self.name!r}: "
                             f"choose from {', '.join(self.precisions)}{alt}.")
        if pattern not in self.patterns:
            raise ValueError(f"pattern={pattern!r} is not available in engine {self.name!r}: "
                             f"choose from {', '.join(self.patterns)}{alt}.")
        if mtp_draft and not self.mtp:
            raise ValueError(f"mtp_draft={mtp_draft} needs multi-token prediction, which engine {self.name!r} "
                             f"does not have: use 0{alt}.")
        if attn_tp > 1 and not self.tp_attention:
            raise ValueError(f"attn_tp={attn_tp} needs tensor-parallel attention, which engine {self.name!r} "
                             f"does not have: use 1{alt}.")


MOELINK = EngineProfile(
    "moelink", "this repository's engine: DP attention + EP, NCCL-style all-to-all, Triton MoE kernels",
    # SM-occupying all-to-all kernels: two-batch overlap hides what NCCL/DeepEP-normal overlap hides.
    replace(DEFAULT_EFFICIENCY, overlap_rdma=DEFAULT_EFFICIENCY.overlap_sm,
            spec=SpecCost(FALLBACK_EAGER_LAYER_S, FALLBACK_HOST_S_PER_SEQ, "assumed (planner/spec_cost.py)")),
    patterns=("rank", "node"), precisions=("bf16", "fp8", "int4", "mxfp4"), measured_kernels=True, mtp=True,
    tp_attention=True,
    features=(
        Feature("Triton grouped-GEMM MoE kernels (BF16, FP8 block-scaled)", BUILT_MEASURED,
                "benchmarks/results/moe_kernels_NVIDIA_H100_80GB_HBM3_*.json"),
        Feature("data-parallel attention, one request set per rank", BUILT_MEASURED,
                "GPU tests, engine decode on one H100"),
        Feature("all-to-all once per destination rank (pattern rank)", BUILT,
                "CPU ranks (gloo); NCCL at world size 1 on GPU", tag="rank"),
        Feature("low-latency (decode) / high-throughput (prefill) dispatch modes", BUILT, "issue 17, CPU ranks",
                tag="ep"),
        Feature("two-batch overlap of all-to-all with compute (overlap tbo)", BUILT, "issue 17, CPU ranks",
                tag="tbo"),
        Feature("node-aware two-level all-to-all (pattern node)", BUILT, "issue 17, CPU ranks", tag="node"),
        Feature("CUDA graphs for decode", BUILT_MEASURED, "single GPU; under EP: issue 17, not GPU-measured"),
        Feature("FP8 KV cache (precision attention fp8)", BUILT, "--kv-cache-dtype fp8", tag="fp8_kv"),
        Feature("redundant experts (replicas of hot experts)", BUILT, "moe/placement.py, CPU ranks",
                tag="redundant"),
        Feature("INT4 W4A16 routed experts (precision int4: Kimi K2 Thinking / K2.5, GPTQ, AWQ)", BUILT,
                "issue 44: decode GEMVs + dequantizing K loops, CPU-checked; not GPU-measured (kernel time from "
                "the bf16 roofline at INT4 bytes)", tag="int4"),
        Feature("MXFP4 W4A16 routed experts (precision mxfp4: gpt-oss, DeepSeek-V4 as published)", BUILT,
                "kernels/mxfp4.py: CPU-checked; not GPU-measured (kernel time from the bf16 roofline at MXFP4 bytes)",
                tag="mxfp4"),
        Feature("FP4 tensor-core experts / FP4 dispatch", NOT_BUILT,
                "precision fp4 refused; NVFP4 checkpoints load and run W4A16 (dequantized to bf16 MMAs, issue 31)",
                tag="fp4"),
        Feature("multi-token prediction (MTP) drafts, verified in one step", BUILT,
                "issue 29: MTP drafter + verify step, greedy-exact and distribution-exact on CPU; verify graphs "
                "(low-latency under EP), drafts eager, serial loop (planner/spec_cost.py prices those)",
                tag="mtp"),
        Feature("tensor-parallel attention (-tp N: heads, dense MLP, vocab split; with -ep the MoE on 1/N token "
                "slices, EP over the world; -tp alone splits the experts)", BUILT,
                "issue 46: CPU ranks (gloo) equal one rank / transformers; not GPU-measured (priced with EP: one "
                "all-reduce per layer and one all-gather per MoE layer on the node's fabric, 1/t of the projection "
                "weights per GPU)", tag="attn_tp"),
    ),
)

PUBLISHED = EngineProfile(
    "published", "the published engines of the calibration table (DeepSeek, SGLang, TensorRT-LLM)",
    DEFAULT_EFFICIENCY, patterns=("rank", "expert", "node", "allgather"), precisions=("bf16", "fp8", "fp4"),
    measured_kernels=False, mtp=True, tp_attention=True,
    features=(Feature("every mode the calibration rows use (DeepEP, TBO, MTP, NVFP4, TP attention)", BUILT,
                      "published, not measured here"),),
)

ENGINES = {e.name: e for e in (MOELINK, PUBLISHED)}


def get_engine(name: str, gpu: str | None = None) -> EngineProfile:
    """Engine profile by name; a ValueError lists the known names. moelink's comes with its per-layer fixed
    cost fitted on its own measured decode steps when benchmarks/results has them (`engine_measured`), and, for
    `gpu` (a hardware profile's GPU name), its fixed cost per step from the newest engine_e2e result measured
    on that GPU (`step_cost`; the published constant otherwise, and the profile says which)."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r} is not known: choose from {', '.join(ENGINES)}.")
    return _measured_moelink(gpu) if name == "moelink" else ENGINES[name]


@functools.lru_cache(maxsize=16)
def _measured_moelink(gpu: str | None = None) -> EngineProfile:
    from .engine_measured import load_engine_decode, with_measured_overhead
    from .step_cost import step_cost_for_gpu

    eff = with_measured_overhead(MOELINK.efficiency)
    features = MOELINK.features
    if eff is not MOELINK.efficiency:
        src = ", ".join(sorted({p.source for p in load_engine_decode()}))
        features += (Feature(f"per-layer fixed cost {eff.layer_overhead_s * 1e6:.0f} us (small kernels in a CUDA graph)",
                             BUILT_MEASURED, f"fitted on the batch-1 decode step of {src} (Qwen3-30B-A3B, one GPU)"),)
    cost = step_cost_for_gpu(gpu)
    spec = spec_cost(gpu)
    eff = replace(eff, step_overhead_s=cost.seconds, spec=spec)
    features += (Feature("speculative steps beyond their device work", BUILT_MEASURED, spec.text, tag="mtp"),)
    features += (Feature(f"fixed cost per engine step {cost.seconds * 1e3:.2f} ms (host work the GPU does not hide)",
                         BUILT_MEASURED if cost.measured else BUILT, cost.text),)
    return replace(MOELINK, efficiency=eff, features=features, step_cost_note=cost.text)
