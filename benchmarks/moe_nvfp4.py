"""NVIDIA's FP4 MoE shapes on one GPU: the NVFP4 fused MoE (ModelOpt's experts, dequantized in the K loop, W4A16) vs
the bf16 fused MoE on the same weights dequantized up front, SiLU, no biases.

    python -m moelink.benchmarks.moe_nvfp4 [--shapes qwen3-30b-a3b,deepseek-v3] [--tokens 1,16,64,256,1024,4096]
        [--out benchmarks/results/moe_nvfp4_<gpu>.json] [--cpu-smoke]

Timing as benchmarks/moe_kernels.py (its Timer: median of CUDA events, L2 flushed, inputs rotated, CUDA-graph
replay where capturable). GB/s counts the bytes each system must read: NVFP4 weights are 9/16 byte per value
(a half byte plus one e4m3 scale per 16), bf16 weights 2 bytes, for the experts that got a token: at decode sizes
NVFP4's ceiling is ~3.6x fewer bytes than bf16. Each point also checks the NVFP4 result against the bf16 one
(same dequantized weights: only rounding differs). benchmarks/moe_mxfp4.py is the MXFP4 twin.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from moelink.engine.api.provenance import write_result

from .moe_kernels import RESULTS, Timer, require_cuda, run_meta

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v3": (256, 8, 7168, 2048)}  # (E, top-k, D, I)
TOKENS = (1, 16, 64, 256, 1024, 4096)
SMOKE_SHAPES = {"smoke": (8, 2, 64, 48)}
SMOKE_TOKENS = (1, 9)


def make_layer(E, D, I, device, gen) -> dict:
    """Random NVFP4 weights in ModelOpt's layout: any byte (two e2m1 codes), e4m3 block scales in [224, 448] and
    global scales putting the largest weights near 0.02; gate and up with different global scales."""
    u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, device=device, generator=gen)  # noqa: E731

    def scales(*s):
        return (torch.rand(*s, device=device, generator=gen) * 224 + 224).to(torch.float8_e4m3fn)

    g = 0.02 / (6 * 448)
    return dict(w13q=u8(E, 2 * I, D // 2), w13s=scales(E, 2 * I, D // 16),
                w13g=torch.tensor([g, 0.7 * g], device=device).repeat(E, 1), w2q=u8(E, D, I // 2),
                w2s=scales(E, D, I // 16), w2g=torch.full((E,), g, device=device))


def bench(shapes, tokens, device, iters, graphs) -> list[dict]:
    from moelink.kernels.nvfp4 import nvfp4_dequantize
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_nvfp4 import triton_fused_moe_nvfp4

    timer = Timer(device)
    rows = []
    for name, (E, K, D, I) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        L = make_layer(E, D, I, device, gen)
        w13 = torch.cat([nvfp4_dequantize(L["w13q"][:, h * I:(h + 1) * I], L["w13s"][:, h * I:(h + 1) * I],
                                          L["w13g"][:, h], torch.bfloat16) for h in (0, 1)], 1)
        w2 = nvfp4_dequantize(L["w2q"], L["w2s"], L["w2g"], torch.bfloat16)
        weights = (L["w13q"], L["w13s"], L["w13g"], L["w2q"], L["w2s"], L["w2g"])
        systems = {"nvfp4-triton": lambda x, tw, ti: triton_fused_moe_nvfp4(x, *weights, tw, ti),
                   "bf16-triton": lambda x, tw, ti: triton_fused_moe(x, w13, w2, tw, ti)}
        for T in tokens:
            sets = []
            for _ in range(4 if device.type == "cuda" else 1):
                x = torch.randn(T, D, device=device, generator=gen).bfloat16()
                tw, ti = torch.topk(torch.randn(T, E, device=device, generator=gen).softmax(-1), K)
                sets.append((x, tw, ti))
            touched = statistics.mean(int(torch.unique(s[2]).numel()) for s in sets)
            got = {n: fn(*sets[0]).float() for n, fn in systems.items()}
            err = float((got["nvfp4-triton"] - got["bf16-triton"]).norm() / got["bf16-triton"].norm())
            if not err <= 2e-2:
                raise AssertionError(f"{name} T={T}: NVFP4 vs bf16 relative error {err:.3g}")
            for sys_name, fn in systems.items():
                t_eager = timer(fn, sets, iters=iters, warmup=3 if device.type == "cuda" else 1)
                t_graph = timer.graph(fn, sets, iters=iters) if graphs else None
                t = t_graph or t_eager
                per_value = 9 / 16 if sys_name.startswith("nvfp4") else 2
                bytes_ = touched * 3 * D * I * per_value + 2 * T * D * 2
                flops = 6.0 * T * K * D * I
                rows.append(dict(shape=name, E=E, K=K, D=D, I=I, tokens=T, system=sys_name, median_ms=t * 1e3,
                                 eager_ms=t_eager * 1e3, graph_ms=None if t_graph is None else t_graph * 1e3,
                                 TFLOPs=flops / t / 1e12, GBps=bytes_ / t / 1e9, experts_touched=touched,
                                 rel_err_vs_bf16=err))
                print(f"{name:>13} T={T:>5} {sys_name:>13} {t * 1e3:9.3f} ms (eager {t_eager * 1e3:9.3f}) "
                      f"{rows[-1]['TFLOPs']:7.1f} TFLOP/s {rows[-1]['GBps']:7.0f} GB/s", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per point (median reported)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches only")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe_nvfp4_<gpu>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
        device, shapes, tokens, iters = torch.device("cpu"), SMOKE_SHAPES, list(SMOKE_TOKENS), 1
    else:
        device = require_cuda("moe_nvfp4")
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        tokens, iters = [int(t) for t in args.tokens.split(",")], args.iters
    rows = bench(shapes, tokens, device, iters, graphs=not args.no_graphs and device.type == "cuda")
    result = dict(benchmark="moe_nvfp4", **run_meta(device), results=rows,
                  timing="as benchmarks/moe_kernels.py" if device.type == "cuda"
                  else "CPU smoke: wall clock in the Triton interpreter, meaningless as speed")
    tag = "cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS / f"moe_nvfp4_{tag}.json"
    write_result(out, result)
    print(json.dumps({"points": len(rows)}))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
