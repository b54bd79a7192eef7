"""The INT4 (W4A16) fused MoE's compile cases (benchmarks/compile_cases.py has the machinery: the stand-in driver and
the `Recorder` that turns launches into ahead-of-time compiles), compiled by `compile_report.py --only int4` for
sm_90: Kimi K2 Thinking / K2.5's experts (384 x [2048, 7168], group 32, symmetric, bf16 scales) and a GPTQ / AWQ
Qwen3-30B-A3B (128 x [768, 2048], group 128, zero points), at every int4_moe_default.json bucket (the tiny GEMVs at
bucket 0, the per-tile path above, the dequantize-once pre-pass and the float GEMMs at the DEQUANT bucket), the
per-tile path at decode sizes, an expert map and the atomic combine."""
from __future__ import annotations

import torch

from .compile_cases import MODEL_SHAPES, Recorder

# (E, top-k, D, I, group, zero points): the published INT4 MoE checkpoints' shapes.
INT4_SHAPES = {"kimi-k2": (384, 8, 7168, 2048, 32, False),
               "qwen3-30b-a3b gptq": (*MODEL_SHAPES["qwen3-30b-a3b"], 128, True)}


def compile_moe_int4(rec: Recorder, quick: bool) -> None:
    """The INT4 fused MoE (kernels/triton_moe_int4.py) at the shapes above (module docstring)."""
    from moelink.kernels.moe_config import committed_config
    from moelink.kernels.triton_moe_int4 import triton_fused_moe_int4

    meta = dict(device="meta")
    bf = torch.bfloat16
    _, table = committed_config("int4_moe_default.json")
    for name, (E, K, D, I, G, zp) in INT4_SHAPES.items():
        q = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
        s = lambda *s_: torch.empty(*s_, dtype=bf, **meta)  # noqa: E731
        z = (lambda *s_: torch.empty(*s_, dtype=torch.uint8, **meta)) if zp else (lambda *s_: None)
        w = (q(E, 2 * I, D // 8), s(E, 2 * I, D // G), q(E, D, I // 8), s(E, D, I // G))
        zeros = dict(w13_z_EFS=z(E, 2 * I, D // G), w2_z_EDS=z(E, D, I // G))
        # (label, T, dtype, expert map?, combine, path)
        variants = [(f"int4_moe_default.json[{b}]", max(1, -(-b * E // K)), bf, False, "sum", "auto") for b, _ in table]
        variants += [("per-tile at 1 token", 1, bf, False, "sum", "sorted"), ("tiny at 64 tokens", 64, bf, False, "sum",
                                                                              "tiny")]
        if not quick:
            variants += [("expert map", 64, bf, True, "sum", "auto"), ("tiny expert map", 1, bf, True, "sum", "auto"),
                         ("atomic", 4096, bf, False, "atomic", "sorted"), ("tiny fp16", 1, torch.float16, False, "sum",
                                                                           "auto")]
        for label, T, dt, emap, combine, path in variants[:1] if quick else variants:
            w13q, w13s, w2q, w2s = (t.to(dt) if t.dtype == bf else t for t in w)
            with rec.labelled(f"{name} INT4 g{G}{' zp' if zp else ''} T={T} {label}"):
                triton_fused_moe_int4(torch.empty(T, D, dtype=dt, **meta), w13q, w13s, w2q, w2s, torch.empty(T, K, **meta),
                                      torch.empty(T, K, dtype=torch.long, **meta),
                                      torch.empty(E, dtype=torch.int32, **meta) if emap else None, combine=combine,
                                      path=path, **zeros)
        if quick:
            break
