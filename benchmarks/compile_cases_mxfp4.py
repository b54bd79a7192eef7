"""Compile cases of the MXFP4 fused MoE (gpt-oss; benchmarks/compile_report.py's `mxfp4` family): its three paths
at gpt-oss shapes; the shared machinery (Recorder, launch-config files) is benchmarks/compile_cases.py's."""
from __future__ import annotations

import torch

from .compile_cases import Recorder


GPT_OSS_SHAPES = {"gpt-oss-120b": (128, 4, 2880, 2880), "gpt-oss-20b": (32, 4, 2880, 2880)}


def compile_moe_mxfp4(rec: Recorder, quick: bool) -> None:
    """The MXFP4 fused MoE at gpt-oss shapes, published layout: every bucket of mxfp4_moe_default.json at its
    fewest tokens (bucket 0: the two GEMVs; DEQUANT buckets: the pre-pass and the float kernels), the GEMVs at
    their largest batch, the per-tile path where another path is the default (the benchmark's per-tile rows), an
    expert map, the atomic combine, fp16; and the bf16 fused MoE with biases and swiglu_oai (float checkpoints). The
    blocks in the decode's pair order, as the engine holds them on a GPU (moe/layer.py: kernels/mxfp4.to_pair_order)."""
    from moelink.kernels.moe import MoEActivation
    from moelink.kernels.moe_config import committed_config
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    meta = dict(device="meta")
    u8 = lambda *s: torch.empty(*s, dtype=torch.uint8, **meta)  # noqa: E731
    act = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
    _, table = committed_config("mxfp4_moe_default.json")
    for name, (E, K, D, I) in GPT_OSS_SHAPES.items():
        w = (u8(E, 2 * I, D // 32, 16), u8(E, 2 * I, D // 32), u8(E, D, I // 32, 16), u8(E, D, I // 32))
        bf = torch.bfloat16
        bias = dict(b13_EF=torch.empty(E, 2 * I, dtype=bf, **meta), b2_ED=torch.empty(E, D, dtype=bf, **meta))
        # (label, T, dtype, expert map?, combine, path)
        variants = [(f"mxfp4_moe_default.json[{b}]", max(1, -(-b * E // K)), bf, False, "sum", "auto") for b, _ in table]
        variants += [(f"{v[0]} per-tile", *v[1:5], "sorted") for v, (_, c) in zip(variants, table) if c.tiny or c.dequant]
        tiny_max = min(table[0][1].tiny.max_pairs // K, -(-table[1][0] * E // K) - 1)  # the bucket's last T
        variants.append((f"mxfp4_moe_default.json[0] tiny at {tiny_max} tokens", tiny_max, bf, False, "sum", "auto"))
        if name == "gpt-oss-120b" and not quick:
            variants += [("expert map", 64, bf, True, "sum", "auto"), ("tiny expert map", 1, bf, True, "sum", "auto"),
                         ("atomic", 4096, bf, False, "atomic", "auto"), ("fp16", 64, torch.float16, False, "sum", "auto"),
                         ("tiny fp16", 1, torch.float16, False, "sum", "auto"),
                         ("dequant fp16", 16384, torch.float16, False, "sum", "auto")]
        for label, T, dt, emap, combine, path in variants[:1] if quick else variants:
            with rec.labelled(f"{name} MXFP4 T={T} {label}"):
                triton_fused_moe_mxfp4(torch.empty(T, D, dtype=dt, **meta), *w, torch.empty(T, K, **meta),
                                       torch.empty(T, K, dtype=torch.long, **meta),
                                       torch.empty(E, dtype=torch.int32, **meta) if emap else None,
                                       activation=act, combine=combine, native=False, path=path, pair_order=True,
                                       **bias)
        if quick:
            break
        for T in (1, 4096):
            with rec.labelled(f"{name} bf16 weights + biases + swiglu_oai T={T}"):
                triton_fused_moe(torch.empty(T, D, dtype=bf, **meta), torch.empty(E, 2 * I, D, dtype=bf, **meta),
                                 torch.empty(E, D, I, dtype=bf, **meta), torch.empty(T, K, **meta),
                                 torch.empty(T, K, dtype=torch.long, **meta), activation=act, **bias)
