"""Device time of one run of the engine by kernel family (torch.profiler): where a step's time is, on a GPU.

Used by `batch_invariant --kernel-times` (the invariant arm against the normal one) and `engine_e2e --kernel-times`
(a prefill-heavy generate: the experts against attention and the dense projections)."""
from __future__ import annotations

import torch

# Kernel families by name (substrings, first match wins): which part of a step the time is in. batch_invariant: the
# invariant arm's fixed-tile matmul against cuBLAS, its split + merge attention against the decode / prefill kernels,
# the fused MoE on its one config against the tuned ones; engine_e2e: a prefill step's experts, attention and dense
# projections (issue 80's prefill row). The decode GEMVs that carry a norm or the attention input's epilogue
# (kernels/triton_qkv_rope_kv.py, triton_linear_norm.py) and the dense MLP's two (triton_mlp_gemv.py, their names
# "_mlp_") are the projections' time: matmul, before "kv" and "norm".
KERNEL_FAMILIES = (("matmul", ("_norm_qkv", "_linear_norm", "_mlp_")), ("moe", ("moe", "align", "router", "_gate_topk", "silu")),
                   ("attention", ("_bi_split", "_bi_merge", "decode",
                   "prefill", "attention", "rope", "kv")), ("matmul", ("matmul", "gemm", "xmma", "cutlass", "nvjet",
                   "cublas", "aten::mm", "aten::addmm", "aten::linear")), ("norm", ("rms", "norm")))


def kernel_family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in KERNEL_FAMILIES if any(k in low for k in keys)), "other")


def kernel_times(run, device: str, top: int = 20) -> dict:
    """One more round of `run` under torch.profiler: its kernels' device time (CUDA; CPU: the ops' self time) summed
    by family (`kernel_family_us`) and the `top` kernels by name (`kernel_us`), microseconds a round. Kernels a decode
    graph replays are traced one by one (CUPTI records a graph's kernel nodes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        if device == "cuda":
            torch.cuda.synchronize()
    per_name: dict[str, float] = {}
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", 0.0) if device == "cuda" else e.self_cpu_time_total)
        if us > 0 and not e.key.startswith(("cuda", "ProfilerStep")):
            per_name[e.key] = per_name.get(e.key, 0.0) + float(us)
    families: dict[str, float] = {}
    for name, us in per_name.items():
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + us
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return dict(kernel_family_us={k: round(v, 1) for k, v in sorted(families.items())},
                kernel_us={k: round(v, 1) for k, v in ranked})
