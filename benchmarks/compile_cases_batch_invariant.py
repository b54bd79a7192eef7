"""Compile cases of batch-invariant mode's Triton kernels (kernels/batch_invariant_triton.py) at Qwen3-30B-A3B's
shapes, and gpt-oss's heads for the sinks / sliding-window variant: the fused MoE on its one config (a decode and a
prefill token count give the same launch, which is the point), paged attention's split and merge kernels, the
fixed-tile matmul. Shared by benchmarks/compile_report.py (`--only batch_invariant`) and
tests/kernels/test_triton_compile.py (sm_90 and sm_100, spills checked)."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch


def launch_batch_invariant(dtypes: tuple[torch.dtype, ...],
                           labelled: Callable[[str], ContextManager] = lambda case: contextlib.nullcontext()) -> None:
    """Each kernel's launches on meta tensors (compiled, never run, by the caller's stand-in driver)."""
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.batch_invariant_triton import invariant_triton_fused_moe
    from moelink.kernels.triton_invariant_attention import triton_invariant_paged_attention
    from moelink.kernels.triton_invariant_matmul import triton_invariant_linear

    meta = dict(device="meta")
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
    for dt in dtypes:
        name = str(dt)[6:]
        E, K, D, I = 128, 8, 2048, 768
        for T in (1, 4096):
            with labelled(f"batch-invariant qwen3-30b-a3b MoE T={T} {name}"):
                invariant_triton_fused_moe(torch.empty(T, D, dtype=dt, **meta),
                                           torch.empty(E, 2 * I, D, dtype=dt, **meta),
                                           torch.empty(E, D, I, dtype=dt, **meta), torch.empty(T, K, **meta),
                                           torch.empty(T, K, dtype=torch.long, **meta))
        for label, N, Kh, H, extra in [("qwen3 32/4", 32, 4, 128, False), ("gpt-oss 64/8 sliding", 64, 8, 64, True)]:
            S, T = 8, 40
            q = torch.empty(T, N, H, dtype=dt, **meta)
            cache = torch.empty(100, 16, Kh, H, dtype=dt, **meta)
            mixed = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(T, dtype=torch.long, **meta),
                                      [1] * 7 + [33], [1000] * 8, 33, 1000, 99)
            with labelled(f"batch-invariant {label} attention, mixed batch {name}"):
                triton_invariant_paged_attention(q, cache, cache, mixed, 0.1,
                                                 sinks_N=torch.empty(N, dtype=dt, **meta) if extra else None,
                                                 sliding_window=128 if extra else None)
        with labelled(f"batch-invariant linear 33 x 2048 -> 4096 {name}"):
            triton_invariant_linear(torch.empty(33, 2048, dtype=dt, **meta), torch.empty(4096, 2048, dtype=dt, **meta))


def compile_batch_invariant(rec, quick: bool) -> None:
    """The report's cases (benchmarks/compile_report.py): bf16, and fp32 (its smaller tiles) unless quick."""
    launch_batch_invariant((torch.bfloat16,) if quick else (torch.bfloat16, torch.float32), rec.labelled)
