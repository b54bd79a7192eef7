"""gpt-oss experts on one GPU: the MXFP4 fused MoE's paths vs the bf16 fused MoE on the same weights dequantized
up front, all with biases and swiglu_oai.

    python -m moelink.benchmarks.moe_mxfp4 [--shapes gpt-oss-120b,gpt-oss-20b] [--tokens 1,16,64,256,1024,4096,16384]
        [--out benchmarks/results/moe_mxfp4_<gpu>.json] [--cpu-smoke]

Systems at every point (kernels/triton_moe_mxfp4.py):
- `mxfp4-triton`: what the engine runs (path="auto": the MXFP4 launch config picks `path`, recorded per row);
- `mxfp4-per-tile`: path="sorted", the weights dequantized in the GEMMs' K loop once per M tile (the path all
  sizes took before the tiny and dequant paths);
- `mxfp4-tiny` (T*K <= 256): path="tiny", the two GEMVs of kernels/triton_moe_mxfp4_tiny.py;
- `mxfp4-dequant` (T >= 256, or where auto picks it): path="dequant", every local expert dequantized once (kernels/triton_mxfp4_dequant.py)
  then the float sorted path; and `mxfp4-prepass` (same T), the pre-pass alone (two launches, both weights), whose
  bytes are the whole cost (17/32 + 2 bytes a value): its GB/s checks the cost model;
- `bf16-triton`: the float fused MoE on the dequantized bf16 weights (its auto path).
Each row's `vs_bf16` is bf16-triton's time over the row's (> 1: faster than bf16).
Timing as benchmarks/moe_kernels.py (its Timer: median of CUDA events, L2 flushed, inputs rotated, CUDA-graph
replay where capturable). GB/s counts the bytes each system must read: MXFP4 weights are 17/32 byte per value
(a half byte plus one scale byte per 32), bf16 weights 2 bytes, for the experts that got a token. Each point
also checks every MXFP4 result against the bf16 one (same dequantized weights: only rounding differs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from moelink.engine.api.provenance import write_result

from .moe_kernels import RESULTS, Timer, require_cuda, run_meta

SHAPES = {"gpt-oss-120b": (128, 4, 2880, 2880), "gpt-oss-20b": (32, 4, 2880, 2880)}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
TINY_MAX_PAIRS, DEQUANT_MIN_TOKENS = 256, 256  # where the forced tiny / dequant rows are measured
SMOKE_SHAPES = {"smoke": (8, 2, 64, 64)}
SMOKE_TOKENS = (1, 9, 64)  # the interpreter's table: tiny, per-tile, dequant
SMOKE_TINY_MAX_PAIRS = 32  # (the interpreter runs a GEMV program per pair and row block: slow)


def make_layer(E, D, I, device, gen) -> dict:
    """Random MXFP4 weights in the published layout (exponents 118..122, about gpt-oss's spread) and bf16 biases."""
    u8 = lambda *s, lo=0, hi=256: torch.randint(lo, hi, s, dtype=torch.uint8, device=device, generator=gen)  # noqa: E731
    return dict(w13q=u8(E, 2 * I, D // 32, 16), w13s=u8(E, 2 * I, D // 32, lo=118, hi=123),
                w2q=u8(E, D, I // 32, 16), w2s=u8(E, D, I // 32, lo=118, hi=123),
                b13=(torch.randn(E, 2 * I, device=device, generator=gen) * 0.1).bfloat16(),
                b2=(torch.randn(E, D, device=device, generator=gen) * 0.1).bfloat16())


def bench(shapes, tokens, device, iters, graphs, tiny_max_pairs: int = TINY_MAX_PAIRS) -> list[dict]:
    from moelink.kernels.moe import MoEActivation
    from moelink.kernels.mxfp4 import mxfp4_dequantize
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_table, mxfp4_path, triton_fused_moe_mxfp4
    from moelink.kernels.triton_mxfp4_dequant import dequantize_experts
    from moelink.kernels.moe_config import _pick, device_name

    act = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
    timer = Timer(device)
    rows = []
    for name, (E, K, D, I) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        L = make_layer(E, D, I, device, gen)
        w13 = mxfp4_dequantize(L["w13q"], L["w13s"], torch.bfloat16)
        w2 = mxfp4_dequantize(L["w2q"], L["w2s"], torch.bfloat16)

        def mxfp4(path):
            return lambda x, tw, ti: triton_fused_moe_mxfp4(x, L["w13q"], L["w13s"], L["w2q"], L["w2s"], tw, ti,
                                                            b13_EF=L["b13"], b2_ED=L["b2"], activation=act, path=path)

        def prepass(x, tw, ti):
            dequantize_experts(L["w13q"], L["w13s"], x.dtype)
            return dequantize_experts(L["w2q"], L["w2s"], x.dtype)

        table = mxfp4_config_table(E, I, device_name(device))
        for T in tokens:
            sets = []
            for _ in range(4 if device.type == "cuda" else 1):
                x = torch.randn(T, D, device=device, generator=gen).bfloat16()
                tw, ti = torch.topk(torch.randn(T, E, device=device, generator=gen).softmax(-1), K)
                sets.append((x, tw, ti))
            touched = statistics.mean(int(torch.unique(s[2]).numel()) for s in sets)
            auto_path = mxfp4_path(_pick(*table, T, K, E), T, K)
            dequant_rows = T >= DEQUANT_MIN_TOKENS or auto_path == "dequant"
            systems = {"mxfp4-triton": mxfp4("auto"), "mxfp4-per-tile": mxfp4("sorted")}
            if T * K <= tiny_max_pairs:
                systems["mxfp4-tiny"] = mxfp4("tiny")
            if dequant_rows:
                systems["mxfp4-dequant"] = mxfp4("dequant")
            systems["bf16-triton"] = lambda x, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, b13_EF=L["b13"],
                                                                        b2_ED=L["b2"], activation=act)
            got, check_s = {}, {}
            for n, fn in systems.items():
                t0 = time.perf_counter()
                out = fn(*sets[0])
                check_s[n] = time.perf_counter() - t0
                got[n] = out.float()
            errs = {n: float((g - got["bf16-triton"]).norm() / got["bf16-triton"].norm()) for n, g in got.items()}
            for n, err in errs.items():
                if not err <= 2e-2:
                    raise AssertionError(f"{name} T={T} {n}: relative error vs bf16 {err:.3g}")
            if dequant_rows:
                systems["mxfp4-prepass"] = prepass
            point = []
            for sys_name, fn in systems.items():
                if device.type == "cpu" and iters == 1 and sys_name in check_s:
                    # The timer would make the same one call on sets[0] (no warm-up on CPU: nothing compiles) and
                    # time it the same way: the check's call, timed above, is that call (the smoke's interpreter
                    # runs each system once, not twice).
                    t_eager = check_s[sys_name]
                else:
                    t_eager = timer(fn, sets, iters=iters, warmup=3 if device.type == "cuda" else 0)
                t_graph = timer.graph(fn, sets, iters=iters) if graphs else None
                t = t_graph or t_eager
                mx = sys_name.startswith("mxfp4")
                if sys_name == "mxfp4-prepass":  # all E experts: read the packed bytes, write bf16
                    bytes_, flops = E * 3 * D * I * (17 / 32 + 2), 0.0
                else:
                    bytes_ = touched * 3 * D * I * (17 / 32 if mx else 2) + 2 * T * D * 2
                    flops = 6.0 * T * K * D * I
                point.append(dict(shape=name, E=E, K=K, D=D, I=I, tokens=T, system=sys_name,
                                  path=auto_path if sys_name == "mxfp4-triton" else None, median_ms=t * 1e3,
                                  eager_ms=t_eager * 1e3, graph_ms=None if t_graph is None else t_graph * 1e3,
                                  TFLOPs=flops / t / 1e12, GBps=bytes_ / t / 1e9, experts_touched=touched,
                                  rel_err_vs_bf16=errs.get(sys_name, 0.0)))
            bf16_ms = next(r["median_ms"] for r in point if r["system"] == "bf16-triton")
            for r in point:
                r["vs_bf16"] = bf16_ms / r["median_ms"]
                print(f"{name:>13} T={T:>5} {r['system']:>14} {r['median_ms']:9.3f} ms (eager {r['eager_ms']:9.3f}) "
                      f"{r['TFLOPs']:7.1f} TFLOP/s {r['GBps']:7.0f} GB/s  {r['vs_bf16']:5.2f}x bf16"
                      f"{'  path=' + r['path'] if r['path'] else ''}", flush=True)
            rows += point
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per point (median reported)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches only")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe_mxfp4_<gpu>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
        device, shapes, tokens, iters = torch.device("cpu"), SMOKE_SHAPES, list(SMOKE_TOKENS), 1
    else:
        device = require_cuda("moe_mxfp4")
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        tokens, iters = [int(t) for t in args.tokens.split(",")], args.iters
    rows = bench(shapes, tokens, device, iters, graphs=not args.no_graphs and device.type == "cuda",
                 tiny_max_pairs=SMOKE_TINY_MAX_PAIRS if args.cpu_smoke else TINY_MAX_PAIRS)
    result = dict(benchmark="moe_mxfp4", **run_meta(device), results=rows,
                  timing="as benchmarks/moe_kernels.py" if device.type == "cuda"
                  else "CPU smoke: wall clock in the Triton interpreter, meaningless as speed")
    tag = "cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS / f"moe_mxfp4_{tag}.json"
    write_result(out, result)
    print(json.dumps({"points": len(rows)}))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
