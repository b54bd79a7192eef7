"""INT4 MoE shapes: the INT4 (W4A16) fused MoE vs the bf16 fused MoE on the same weights dequantized up front, SiLU,
no biases: Kimi K2 Thinking / K2.5's experts (384 x [2048, 7168], group 32, symmetric, bf16 scales) and a GPTQ / AWQ
Qwen3-30B-A3B (128 x [768, 2048], group 128, zero points).

    python -m moelink.benchmarks.moe_int4 --bytes [--tokens 1,2,4,8,16,32,64]    # CPU: bytes read per decode step
    python -m moelink.benchmarks.moe_int4 --prefill --counts [--tokens 1024,...]   # CPU: both prefill paths, counted
    python -m moelink.benchmarks.moe_int4 [--shapes kimi-k2,qwen3-30b-a3b-gptq] [--tokens 1,4,16,64,256,1024,4096]
        [--prefill] [--out benchmarks/results/moe_int4_<gpu>.json] [--cpu-smoke]

`--bytes` (no GPU): what one decode step's MoE layer must read from HBM at decode batch T, counted as
benchmarks/decode_launches.py counts a layer's bytes: the expected experts touched under uniform top-k routing,
E (1 - (1 - K/E)^T), times each expert's weights (INT4: half a byte a value + one scale per group in bf16, + one uint8
zero point per group when asymmetric; bf16: 2 bytes), plus the activations in and out (x, h, y in bf16) and the
routing. The ratio is the ceiling of the INT4 decode speed-up on a memory-bound step (~0.28x the bytes of bf16 at
group 32). The GPU run times both systems (benchmarks/moe_kernels.py's Timer: median of CUDA events, L2 flushed,
inputs rotated, CUDA-graph replay where capturable) and checks every INT4 result against the bf16 one (same
dequantized weights: only rounding differs). gpu_session.sh's `int4` step runs it on a GPU (decode batches 1..64,
then --prefill).

`--prefill` puts the two prefill paths of kernels/triton_moe_int4.py side by side, each against bf16, at prefill
token counts (PREFILL_TOKENS; shapes as one rank's call: Kimi K2.5 at EP 8 holds 48 local experts): "tile" (each M
tile of an expert's rows dequantizes the expert's weights again in its K loop) and "dequant" (every local expert
dequantized once into the workspace, then the bf16 GEMMs). `--counts` (CPU, no kernels): per path the bytes the K
loops stream (weights once per M tile of 128 rows, default.json's BLOCK_M from 512 rows per expert; L2 may
serve repeats), the HBM floor (every byte once: INT4 once for tile; INT4 read + bf16 written + bf16 read for
dequant; bf16 once), the weight values decoded (tile: once per M tile; dequant: once), the MMA FLOPs (equal), each
as a ratio to bf16. On a GPU, `--prefill` times "int4-tile", "int4-dequant" (path forced) and bf16 per count,
and prints both ratios on one line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from moelink.engine.api.provenance import write_result

from .moe_kernels import RESULTS, Timer, require_cuda, run_meta

# (E, top-k, D, I, group, zero points)
SHAPES = {"kimi-k2": (384, 8, 7168, 2048, 32, False), "qwen3-30b-a3b-gptq": (128, 8, 2048, 768, 128, True)}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
BYTES_TOKENS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = (1024, 4096, 16384)
# One rank's expert call at prefill: Kimi K2.5 at EP 8 (48 local of 384 experts), Qwen3-30B-A3B GPTQ at EP 1.
PREFILL_SHAPES = {"kimi-k2-ep8": (48, 8, 7168, 2048, 32, False), "qwen3-30b-a3b-gptq": SHAPES["qwen3-30b-a3b-gptq"]}
SMOKE_SHAPES = {"smoke": (8, 2, 64, 64, 32, True)}
SMOKE_TOKENS = (1, 9)


def expert_bytes(D: int, I: int, fmt: str, group: int = 32, zero_points: bool = False) -> float:
    """Bytes of one expert's three matrices (gate, up: [I, D]; down: [D, I]) as the kernels read them."""
    from moelink.planner.weight_bytes import weight_bytes

    if fmt == "bf16":
        return 3 * D * I * 2
    return (weight_bytes("int4", 2 * I, D, group=group, zero_points=zero_points)
            + weight_bytes("int4", D, I, group=group, zero_points=zero_points))


def step_bytes(shape: tuple, T: int, fmt: str) -> dict:
    """One MoE layer's bytes at decode batch T (module docstring)."""
    E, K, D, I, G, zp = shape
    touched = E * (1 - (1 - K / E) ** T)
    weights = touched * expert_bytes(D, I, fmt, G, zp)
    acts = T * D * 2 + T * K * (I * 2 * 2 + D * 2) + T * D * 2 + T * K * 12  # x; h out + in, y per pair; out; routing
    return dict(experts_touched=touched, weight_bytes=weights, activation_bytes=acts, total_bytes=weights + acts)


def bytes_table(shapes: dict, tokens) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        for T in tokens:
            i4, bf = step_bytes(shape, T, "int4"), step_bytes(shape, T, "bf16")
            rows.append(dict(shape=name, tokens=T, experts_touched=round(i4["experts_touched"], 2),
                             int4_MB=i4["total_bytes"] / 1e6, bf16_MB=bf["total_bytes"] / 1e6,
                             ratio=i4["total_bytes"] / bf["total_bytes"],
                             weight_ratio=i4["weight_bytes"] / bf["weight_bytes"]))
            r = rows[-1]
            print(f"{name:>20} T={T:>3} experts {r['experts_touched']:7.2f}  int4 {r['int4_MB']:9.2f} MB  bf16 "
                  f"{r['bf16_MB']:9.2f} MB  int4/bf16 {r['ratio']:.3f} (weights {r['weight_ratio']:.4f})")
    return rows


def prefill_counts(shape: tuple, T: int, block_m: int = 128) -> dict:
    """The two prefill paths' counted work for one call of T tokens (module docstring: --prefill --counts). Pairs
    are spread evenly (T*K/E rows an expert); every local expert is touched at these sizes."""
    E, K, D, I, G, zp = shape
    values = 3 * D * I  # one expert's weights
    rows = T * K / E
    tiles = E * -(-int(rows) // block_m) if rows >= 1 else E  # M tiles over all experts
    i4, bf = expert_bytes(D, I, "int4", G, zp), expert_bytes(D, I, "bf16")
    acts = T * D * 2 + T * K * (I * 2 * 2 + D * 2) + T * D * 2
    out = dict(tokens=T, rows_per_expert=rows, mma_TFLOP=2 * T * K * values / 1e12)
    paths = {"bf16": dict(stream=tiles * bf, hbm=E * bf, decoded=0),
             "tile": dict(stream=tiles * i4, hbm=E * i4, decoded=tiles * values),
             "dequant": dict(stream=tiles * bf + E * (i4 + bf), hbm=E * (i4 + 2 * bf), decoded=E * values)}
    for name, p in paths.items():
        out[f"{name}_stream_GB"] = (p["stream"] + acts) / 1e9
        out[f"{name}_hbm_GB"] = (p["hbm"] + acts) / 1e9
        out[f"{name}_decoded_G"] = p["decoded"] / 1e9
    for name in ("tile", "dequant"):
        out[f"{name}_stream_ratio"] = out[f"{name}_stream_GB"] / out["bf16_stream_GB"]
        out[f"{name}_hbm_ratio"] = out[f"{name}_hbm_GB"] / out["bf16_hbm_GB"]
    out["decoded_tile_over_dequant"] = out["tile_decoded_G"] / out["dequant_decoded_G"]
    return out


def prefill_table(shapes: dict, tokens) -> list[dict]:
    """--prefill --counts: both paths' ratios to bf16, side by side."""
    rows = []
    for name, shape in shapes.items():
        for T in tokens:
            r = dict(shape=name, **prefill_counts(shape, T))
            rows.append(r)
            print(f"{name:>20} T={T:>6} rows/expert {r['rows_per_expert']:8.1f}  HBM vs bf16: tile "
                  f"{r['tile_hbm_ratio']:.3f} dequant {r['dequant_hbm_ratio']:.3f}  streamed vs bf16: tile "
                  f"{r['tile_stream_ratio']:.3f} dequant {r['dequant_stream_ratio']:.3f}  decoded tile/dequant "
                  f"{r['decoded_tile_over_dequant']:.0f}x  MMA {r['mma_TFLOP']:.2f} TFLOP (all paths)")
    return rows


def make_layer(E, D, I, G, zp, device, gen) -> dict:
    """Random INT4 weights (any words; scales putting the largest weights near 0.02; zero points 0..15)."""
    i32 = lambda *s: torch.randint(-(2**31), 2**31 - 1, s, dtype=torch.int32, device=device, generator=gen)  # noqa: E731
    sc = lambda *s: (torch.rand(*s, device=device, generator=gen) * 0.5 + 0.5).mul(0.02 / 8).bfloat16()  # noqa: E731
    z = (lambda *s: torch.randint(0, 16, s, dtype=torch.uint8, device=device, generator=gen)) if zp else (lambda *s: None)
    return dict(w13q=i32(E, 2 * I, D // 8), w13s=sc(E, 2 * I, D // G), w13z=z(E, 2 * I, D // G),
                w2q=i32(E, D, I // 8), w2s=sc(E, D, I // G), w2z=z(E, D, I // G))


def bench(shapes, tokens, device, iters, graphs, prefill: bool = False) -> list[dict]:
    """Each system timed at each T; `prefill`: the two INT4 prefill paths forced ("tile", "dequant": a workspace
    reused across calls, as a rank's) instead of the auto path, each line printing both ratios to bf16."""
    from moelink.kernels.triton_int4_dequant import DequantWorkspace, dequantize_int4_experts
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_int4 import triton_fused_moe_int4

    timer = Timer(device)
    rows = []
    for name, (E, K, D, I, G, zp) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        L = make_layer(E, D, I, G, zp, device, gen)
        # bf16's weights: the same values (the pre-pass equals int4_dequantize bit for bit), made on the device
        # without int4_dequantize's float32 temporaries (Kimi's 384 experts: 45 GB of them)
        w13 = dequantize_int4_experts(L["w13q"], L["w13s"], L["w13z"], torch.bfloat16)
        w2 = dequantize_int4_experts(L["w2q"], L["w2s"], L["w2z"], torch.bfloat16)
        ws = DequantWorkspace()

        def int4(path):
            return lambda x, tw, ti: triton_fused_moe_int4(x, L["w13q"], L["w13s"], L["w2q"], L["w2s"], tw, ti,
                                                           w13_z_EFS=L["w13z"], w2_z_EDS=L["w2z"], path=path,
                                                           workspace=ws)
        systems = ({"int4-tile": int4("sorted"), "int4-dequant": int4("dequant")} if prefill
                   else {"int4-triton": int4("auto")})
        systems["bf16-triton"] = lambda x, tw, ti: triton_fused_moe(x, w13, w2, tw, ti)
        for T in tokens:
            sets = []
            for _ in range(4 if device.type == "cuda" else 1):
                x = torch.randn(T, D, device=device, generator=gen).bfloat16()
                tw, ti = torch.topk(torch.randn(T, E, device=device, generator=gen).softmax(-1), K)
                sets.append((x, tw, ti))
            touched = statistics.mean(int(torch.unique(s[2]).numel()) for s in sets)
            got = {n: fn(*sets[0]).float() for n, fn in systems.items()}
            errs = {n: float((g - got["bf16-triton"]).norm() / got["bf16-triton"].norm()) for n, g in got.items()}
            for n, err in errs.items():
                if not err <= 2e-2:
                    raise AssertionError(f"{name} T={T} {n}: INT4 vs bf16 relative error {err:.3g}")
            times = {}
            for sys_name, fn in systems.items():
                err = errs[sys_name]
                t_eager = timer(fn, sets, iters=iters, warmup=3 if device.type == "cuda" else 0)  # (CPU: no compiles)
                t_graph = timer.graph(fn, sets, iters=iters) if graphs else None
                t = t_graph or t_eager
                per_expert = expert_bytes(D, I, "int4" if sys_name.startswith("int4") else "bf16", G, zp)
                bytes_ = touched * per_expert + 2 * T * D * 2
                rows.append(dict(shape=name, E=E, K=K, D=D, I=I, group=G, zero_points=zp, tokens=T, system=sys_name,
                                 median_ms=t * 1e3, eager_ms=t_eager * 1e3,
                                 graph_ms=None if t_graph is None else t_graph * 1e3,
                                 TFLOPs=6.0 * T * K * D * I / t / 1e12, GBps=bytes_ / t / 1e9, experts_touched=touched,
                                 rel_err_vs_bf16=err))
                times[sys_name] = t
                print(f"{name:>20} T={T:>5} {sys_name:>12} {t * 1e3:9.3f} ms (eager {t_eager * 1e3:9.3f}) "
                      f"{rows[-1]['GBps']:7.0f} GB/s", flush=True)
            if prefill:
                bf = times["bf16-triton"]
                print(f"RATIO {name} T={T} vs bf16: tile {times['int4-tile'] / bf:.3f}  dequant "
                      f"{times['int4-dequant'] / bf:.3f}  (rows/expert {T * K / E:.0f})", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default=None, help="comma list of token counts")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per point (median reported)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches only")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe_int4_<gpu>.json)")
    ap.add_argument("--bytes", action="store_true", help="CPU: bytes read per decode step, INT4 vs bf16 (no kernels)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    ap.add_argument("--prefill", action="store_true", help="the two prefill paths (per-tile, dequantize-once) vs bf16")
    ap.add_argument("--counts", action="store_true", help="with --prefill, CPU: counted bytes, decodes, FLOPs (no kernels)")
    args = ap.parse_args(argv)
    known = PREFILL_SHAPES if args.prefill else SHAPES
    if args.prefill and args.shapes == ",".join(SHAPES):
        args.shapes = ",".join(PREFILL_SHAPES)
    unknown = [s for s in args.shapes.split(",") if s not in known]
    if unknown and not args.cpu_smoke:
        ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(known)}")
    if args.counts and not args.prefill:
        ap.error("--counts goes with --prefill (--bytes counts the decode steps)")
    if args.prefill and args.counts:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(PREFILL_TOKENS)
        rows = prefill_table({s: PREFILL_SHAPES[s] for s in args.shapes.split(",")}, tokens)
        result: dict[str, Any] = dict(benchmark="moe_int4_prefill_counts", device="cpu (counted, not timed)",
                                      results=rows,
                      method="benchmarks/moe_int4.py prefill_counts: per path streamed / HBM bytes, decodes, MMA FLOPs")
        out = Path(args.out) if args.out else RESULTS / "moe_int4_prefill_counts.json"
        write_result(out, result)
        print(f"wrote {out}")
        return result
    if args.bytes:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(BYTES_TOKENS)
        rows = bytes_table({s: SHAPES[s] for s in args.shapes.split(",")}, tokens)
        result = dict(benchmark="moe_int4_bytes", device="cpu (counted, not timed)", results=rows,
                      method="benchmarks/moe_int4.py step_bytes: expected experts touched x expert bytes + activations")
        out = Path(args.out) if args.out else RESULTS / "moe_int4_bytes.json"
        write_result(out, result)
        print(f"wrote {out}")
        return result
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
        device, shapes, iters = torch.device("cpu"), SMOKE_SHAPES, 1
        smoke = [9, 40] if args.prefill else list(SMOKE_TOKENS)  # (prefill 40: 10 rows an expert)
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else smoke
    else:
        device = require_cuda("moe_int4")
        shapes = {s: known[s] for s in args.shapes.split(",")}
        default = PREFILL_TOKENS if args.prefill else TOKENS
        tokens, iters = [int(t) for t in (args.tokens or ",".join(map(str, default))).split(",")], args.iters
    rows = bench(shapes, tokens, device, iters, graphs=not args.no_graphs and device.type == "cuda",
                 prefill=args.prefill)
    result = dict(benchmark="moe_int4_prefill" if args.prefill else "moe_int4", **run_meta(device), results=rows,
                  timing="as benchmarks/moe_kernels.py" if device.type == "cuda"
                  else "CPU smoke: wall clock in the Triton interpreter, meaningless as speed")
    tag = "cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS / f"moe_int4{'_prefill' if args.prefill else ''}_{tag}.json"
    write_result(out, result)
    print(json.dumps({"points": len(rows)}))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
