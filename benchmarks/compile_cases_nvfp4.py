"""The NVFP4 fused MoE's compile cases (benchmarks/compile_cases.py has the machinery: the stand-in driver and the
`Recorder` that turns launches into ahead-of-time compiles): ModelOpt's NVFP4 experts at the shapes of NVIDIA's FP4
releases, compiled by `compile_report.py --only nvfp4` for sm_90, and for sm_100 with `Recorder.install(100)`
(the native tl.dot_scaled path too, `native=True`, Triton >= 3.9)."""
from __future__ import annotations

import torch

from .compile_cases import MODEL_SHAPES, Recorder

# NVIDIA's FP4 releases (E, top-k, D, I): NVFP4 experts (ModelOpt), SiLU, no biases.
NVFP4_SHAPES = {"qwen3-30b-a3b": MODEL_SHAPES["qwen3-30b-a3b"], "deepseek-v3": MODEL_SHAPES["deepseek-v3"]}


def compile_moe_nvfp4(rec: Recorder, quick: bool, native: bool = False) -> None:
    """The NVFP4 fused MoE (kernels/triton_moe_nvfp4.py) at Qwen3-30B-A3B and DeepSeek-V3(-R1) shapes in ModelOpt's
    layout: every default.json bucket (decode to prefill), an expert map, the atomic combine, fp16 activations.
    `native`: the tl.dot_scaled path instead (compile it for sm_100: Recorder.install(100))."""
    from moelink.kernels.moe_config import committed_config
    from moelink.kernels.triton_moe_nvfp4 import triton_fused_moe_nvfp4

    meta = dict(device="meta")
    u8 = lambda *s: torch.empty(*s, dtype=torch.uint8, **meta)  # noqa: E731
    f8 = lambda *s: torch.empty(*s, dtype=torch.float8_e4m3fn, **meta)  # noqa: E731
    _, default = committed_config("default.json")
    for name, (E, K, D, I) in NVFP4_SHAPES.items():
        w = (u8(E, 2 * I, D // 2), f8(E, 2 * I, D // 16), torch.empty(E, 2, **meta), u8(E, D, I // 2), f8(E, D, I // 16),
             torch.empty(E, **meta))
        variants = [(f"default.json[{b}]", max(1, -(-b * E // K)), torch.bfloat16, False, "sum") for b, _ in default]
        if name == "deepseek-v3" and not quick:
            variants += [("expert map", 64, torch.bfloat16, True, "sum"), ("atomic", 4096, torch.bfloat16, False, "atomic"),
                         ("fp16", 64, torch.float16, False, "sum")]
        for label, T, dt, emap, combine in variants[:1] if quick else variants:
            with rec.labelled(f"{name} NVFP4{' native' if native else ''} T={T} {label}"):
                triton_fused_moe_nvfp4(torch.empty(T, D, dtype=dt, **meta), *w, torch.empty(T, K, **meta),
                                       torch.empty(T, K, dtype=torch.long, **meta),
                                       torch.empty(E, dtype=torch.int32, **meta) if emap else None,
                                       combine=combine, native=native)
        if quick:
            break
