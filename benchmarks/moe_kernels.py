"""MoE expert computation on one GPU: moelink Triton vs permute + torch._grouped_mm vs a per-expert loop.

    python -m moelink.benchmarks.moe_kernels [--shapes qwen3-30b-a3b,mixtral-8x7b,deepseek-v3]
        [--tokens 1,16,64,256,1024,4096,16384] [--out benchmarks/results/moe_kernels_<gpu>.json]

Timed: the whole expert computation from router output to [T, D] result
(align → gate-up GEMM → SiLU·mul → down GEMM → weighted top-k sum), median
of per-iteration CUDA-event times after warm-up. Inputs rotate over several
sets (x, routing) and L2 is flushed before each iteration, so no iteration
finds its weights or activations in cache from the one before. Each system is
timed eagerly and, when it has no host sync (all but the per-expert loop), as
a CUDA-graph replay, which removes host launch overhead the way a decode
engine with graphs does; the graph time is the headline where there is one.

Metrics, beside ceilings measured in the same run:
- TFLOP/s on useful FLOPs, 6·T·K·D·I (padding rows are not counted);
- GB/s on bytes actually touched: the weights of experts that got at least
  one token, x read once, the output written once;
- ceilings: device-to-device copy (read + write bytes of a 2 GiB copy) and
  a dense bf16 8192³ matmul.
Targets (issue 3): geomean speed-up >= 1.2x over the _grouped_mm path; at
<= 64 tokens >= 80% of copy bandwidth; at >= 4096 tokens >= 70% of the matmul TFLOP/s.

Output: a table, JSON and a roofline PNG under benchmarks/results/, with the
device name, date and commit. `--cpu-smoke` runs tiny shapes on CPU (Triton
interpreter, wall-clock timing) to check this script, not to measure anything;
it is sized for CI (tests/benchmarks): each interpreted Triton call costs
0.1-1 s, so it times few token counts and iterations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from moelink.engine.api.provenance import write_result

# Run metadata and measurement helpers live in bench_timing.py; tune_moe.py, engine_decode.py and moe_mxfp4.py
# import them from here.
from .bench_timing import Timer, device_label, measure_ceilings, require_cuda, run_meta  # noqa: F401

# name: (E experts, K top-k, D hidden, I expert intermediate), from the models' config.json.
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "deepseek-v3": (256, 8, 7168, 2048),
}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
SMOKE_SHAPES = {"smoke-e8": (8, 2, 64, 32), "smoke-e16": (16, 4, 32, 48)}
# One token, and enough tokens that experts get several rows; the interpreter's cost grows with T.
SMOKE_TOKENS = (1, 12)
ITERS, SMOKE_ITERS = 30, 1  # (the smoke checks the script, not the timing: one timed run per point)
RESULTS = Path(__file__).parent / "results"


# -- the systems ------------------------------------------------------------------------------------------------------
def moelink_triton(combine: str, path: str = "auto", tiny=None):
    """`tiny` (a TinyConfig): the tiny path's blocks instead of the launch config's (the CPU smoke's wider ones)."""
    from moelink.kernels.triton_moe import triton_fused_moe

    if tiny is None:
        return lambda x, w13, w2, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, combine=combine, path=path)
    from moelink.kernels.moe_config import get_moe_config

    def run(x, w13, w2, tw, ti):
        cfg = replace(get_moe_config(w13.shape[0], w13.shape[1] // 2, ti.shape[0], ti.shape[1], x.device), tiny=tiny)
        return triton_fused_moe(x, w13, w2, tw, ti, combine=combine, path=path, config=cfg)

    return run


# The tiny-batch path re-reads an expert's weights for every pair routed to it: timed up to this many pairs
# (T = 64 at top-8), where it may still win; beyond, it only loses, slowly.
TINY_MAX_PAIRS = 512


def grouped_mm_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK):
    """Permute → _grouped_mm → SiLU·mul → _grouped_mm → unpermute (weighted sum over top-k). No host sync."""
    T, K = topk_ids_TK.shape
    E = w13_EFD.shape[0]
    ids_P = topk_ids_TK.reshape(-1)
    order_P = torch.argsort(ids_P, stable=True)
    # bincount would sync (it sizes its output from the max); a scatter-add does not.
    counts_E = torch.zeros(E, dtype=torch.int32, device=x_TD.device).index_add_(
        0, ids_P, torch.ones_like(ids_P, dtype=torch.int32))
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    xs_PD = x_TD.index_select(0, order_P // K)
    gate_PI, up_PI = torch._grouped_mm(xs_PD, w13_EFD.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
    y_PD = torch._grouped_mm(F.silu(gate_PI) * up_PI, w2_EDI.transpose(1, 2), offs=offs_E)
    y_PD = y_PD * topk_weights_TK.reshape(-1).index_select(0, order_P)[:, None].to(y_PD.dtype)
    unperm_PD = torch.empty_like(y_PD).index_copy_(0, order_P, y_PD)
    return unperm_PD.view(T, K, -1).sum(1)


def per_expert_loop(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK):
    """One pair of matmuls per expert with tokens (the obvious eager-mode code)."""
    T, K = topk_ids_TK.shape
    ids_P = topk_ids_TK.reshape(-1)
    order_P = torch.argsort(ids_P, stable=True)
    counts = torch.bincount(ids_P, minlength=w13_EFD.shape[0]).tolist()  # host sync: the loop needs counts
    weights_P = topk_weights_TK.reshape(-1)
    out_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(counts):
        if n:
            pairs_n = order_P[start : start + n]
            tok_n = pairs_n // K
            gate_nI, up_nI = F.linear(x_TD.index_select(0, tok_n), w13_EFD[e]).chunk(2, dim=-1)
            y_nD = F.linear(F.silu(gate_nI) * up_nI, w2_EDI[e]) * weights_P.index_select(0, pairs_n)[:, None].to(x_TD.dtype)
            out_TD.index_add_(0, tok_n, y_nD)
            start += n
    return out_TD


def systems(has_grouped_mm: bool, tiny=None) -> dict:
    """moelink-triton: what the engine runs (the launch config picks the path); -atomic: the sorted path's
    atomic combine; -tiny: the two-launch tiny-batch path forced (kernels/triton_moe_tiny.py, the config's TINY
    blocks or DEFAULT_TINY; `tiny`'s where given: the CPU smoke's), timed at <= TINY_MAX_PAIRS pairs."""
    out = {"moelink-triton": moelink_triton("sum"), "moelink-triton-atomic": moelink_triton("atomic"),
           "moelink-triton-tiny": moelink_triton("sum", "tiny", tiny)}
    if has_grouped_mm:
        out["torch-grouped_mm"] = grouped_mm_moe
    out["per-expert-loop"] = per_expert_loop
    return out


def smoke_tiny():
    """The CPU smoke's tiny blocks (tune_space.SMOKE_TINY_FLOAT: 8 GEMV rows a program, not DEFAULT_TINY_FLOAT's 2;
    the interpreter's cost is its programs, and the tiny system was over half of the smoke's CPU)."""
    from moelink.kernels.moe_config import TinyConfig

    from .tune_space import SMOKE_TINY_FLOAT

    return TinyConfig.from_dict(SMOKE_TINY_FLOAT)


def _grouped_mm_works(device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
        b = torch.randn(2, 64, 64, dtype=torch.bfloat16, device=device)
        torch._grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):  # e.g. not built for this GPU architecture
        return False


# -- one shape ---------------------------------------------------------------------------------------------------------
def make_weights(E, D, I, dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Fan-in-scaled random expert weights, drawn straight in `dtype` and scaled in place: DeepSeek-V3's
    are 22 GB in bf16, and an fp32 draw plus its scaled copy would peak near 70 GB."""
    w13 = torch.randn(E, 2 * I, D, generator=gen, device=device, dtype=dtype).mul_(1 / math.sqrt(D))
    w2 = torch.randn(E, D, I, generator=gen, device=device, dtype=dtype).mul_(1 / math.sqrt(I))
    return w13, w2


def make_inputs(E, K, D, I, T, dtype, device, gen, n_sets, weights=None):
    """Expert weights (one copy: `weights` if given, else new) and n_sets of (x, topk weights, topk ids)
    from softmax top-k of random logits."""
    w13, w2 = weights if weights is not None else make_weights(E, D, I, dtype, device, gen)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, D, generator=gen, device=device).to(dtype)
        tw, ti = torch.topk(torch.softmax(torch.randn(T, E, generator=gen, device=device), -1), K, dim=-1)
        sets.append((x, w13, w2, (tw / tw.sum(-1, keepdim=True)).float(), ti))
    return sets


def work(E, K, D, I, sets, elem) -> tuple[float, float, int]:
    """(useful FLOPs, bytes touched, experts touched) averaged over the input sets."""
    T = sets[0][0].shape[0]
    touched = statistics.mean(int(torch.unique(s[4]).numel()) for s in sets)
    flops = 6.0 * T * K * D * I
    bytes_ = touched * 3 * D * I * elem + 2 * T * D * elem
    return flops, bytes_, touched


def bench_shape(name, shape, tokens, dtype, device, timer, ceilings, iters, check, graphs,
                only: frozenset[str] | None = None, tiny=None) -> list[dict]:
    E, K, D, I = shape
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    # The interpreter has nothing to warm up: none on CPU (each system ran once for the check, unless --no-check).
    warmup = 3 if device.type == "cuda" else 0
    has_gmm = _grouped_mm_works(device) and dtype == torch.bfloat16
    weights = make_weights(E, D, I, dtype, device, gen)  # once per shape, shared by every token count
    for T in tokens:
        x_bytes = T * D * dtype.itemsize
        n_sets = max(2, min(8, (512 << 20) // max(1, x_bytes))) if device.type == "cuda" else 2
        sets = make_inputs(E, K, D, I, T, dtype, device, gen, n_sets, weights)
        flops, bytes_, touched = work(E, K, D, I, sets, dtype.itemsize)
        ref = None
        for sys_name, fn in systems(has_gmm, tiny).items():
            if only is not None and sys_name not in only:
                continue
            if sys_name == "per-expert-loop" and T * K > 8 * 16384 and device.type == "cpu":
                continue
            if sys_name == "moelink-triton-tiny" and T * K > TINY_MAX_PAIRS:
                continue
            err = check_s = None
            if check:
                t0 = time.perf_counter()
                out = fn(*sets[0])
                check_s = time.perf_counter() - t0
                got = out.float()
                ref = per_expert_loop(*sets[0]).float() if ref is None else ref
                err = float((got - ref).norm() / ref.norm())
                if not err <= 2e-2:  # written so that a NaN fails too
                    raise AssertionError(f"{sys_name} {name} T={T}: relative error {err:.3g} against the per-expert loop")
            if check_s is not None and device.type == "cpu" and iters == 1:
                # The timer would make the same one call on sets[0] (warmup is 0 on CPU) and time it the same way:
                # the check's call, timed above, is that call (the smoke's interpreter runs each system once).
                t_eager = check_s
            else:
                t_eager = timer(fn, sets, iters=iters, warmup=warmup)
            t_graph = timer.graph(fn, sets, iters=iters) if graphs and sys_name != "per-expert-loop" else None
            t = t_graph or t_eager
            row = dict(shape=name, E=E, K=K, D=D, I=I, tokens=T, system=sys_name, median_ms=t * 1e3,
                       eager_ms=t_eager * 1e3, graph_ms=None if t_graph is None else t_graph * 1e3,
                       TFLOPs=flops / t / 1e12, GBps=bytes_ / t / 1e9, flops=flops, bytes=bytes_,
                       experts_touched=touched, intensity=flops / bytes_, rel_err_vs_loop=err)
            row["frac_copy_bw"] = row["GBps"] / ceilings["copy_GBps"]
            row["frac_matmul"] = row["TFLOPs"] / ceilings["matmul_TFLOPs"]
            rows.append(row)
            mode = "graph" if t_graph else "eager"
            print(f"{name:>14} T={T:>5} {sys_name:>22} {t * 1e3:9.3f} ms {mode:>5} (eager {t_eager * 1e3:9.3f}) "
                  f"{row['TFLOPs']:8.1f} TFLOP/s "
                  f"{row['GBps']:8.0f} GB/s ({100 * row['frac_copy_bw']:5.1f}% copy, {100 * row['frac_matmul']:5.1f}% mm)",
                  flush=True)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarize(rows) -> dict:
    by = {(r["shape"], r["tokens"], r["system"]): r for r in rows}
    ours = [r for r in rows if r["system"] == "moelink-triton"]
    speedups = [by[(r["shape"], r["tokens"], "torch-grouped_mm")]["median_ms"] / r["median_ms"]
                for r in ours if (r["shape"], r["tokens"], "torch-grouped_mm") in by]
    small = [r["frac_copy_bw"] for r in ours if r["tokens"] <= 64]
    large = [r["frac_matmul"] for r in ours if r["tokens"] >= 4096]
    tiny = [r for r in ours if (r["shape"], r["tokens"], "moelink-triton-tiny") in by]
    s = dict(geomean_speedup_vs_grouped_mm=math.exp(statistics.mean(map(math.log, speedups))) if speedups else None,
             # per (shape, tokens): moelink-triton time / forced tiny-path time (> 1: the tiny path is faster)
             tiny_speedup_vs_moelink_triton={
                 f"{r['shape']} T={r['tokens']}": round(r["median_ms"] / by[(r["shape"], r["tokens"], "moelink-triton-tiny")]
                                                         ["median_ms"], 4) for r in tiny},
             # per shape, each moelink system's fraction of copy bandwidth at one token (issue 80: >= 0.8)
             frac_copy_bw_1_token={f"{r['shape']} {r['system']}": round(r["frac_copy_bw"], 4) for r in rows
                                   if r["tokens"] == 1 and r["system"].startswith("moelink")},
             min_frac_copy_bw_le64_tokens=min(small) if small else None,
             min_frac_matmul_ge4096_tokens=min(large) if large else None)
    s["targets"] = dict(speedup_ge_1_2=None if s["geomean_speedup_vs_grouped_mm"] is None
                        else s["geomean_speedup_vs_grouped_mm"] >= 1.2,
                        copy_bw_ge_80pct=None if not small else min(small) >= 0.8,
                        matmul_ge_70pct=None if not large else min(large) >= 0.7)
    return s


def plot_roofline(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no roofline plot")
        return False
    ceil = result["ceilings"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [10 ** (i / 20) for i in range(-20, 100)]
    ax.plot(xs, [min(ceil["matmul_TFLOPs"], x * ceil["copy_GBps"] / 1e3) for x in xs], "k-", lw=1,
            label=f"measured roof: {ceil['copy_GBps']:.0f} GB/s copy, {ceil['matmul_TFLOPs']:.0f} TFLOP/s matmul")
    markers = {"moelink-triton": "o", "moelink-triton-atomic": "s", "moelink-triton-tiny": "D", "torch-grouped_mm": "^",
               "per-expert-loop": "x"}
    colors = dict(zip(sorted({r["shape"] for r in result["results"]}), ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for sys_name, mk in markers.items():
        for shape, col in colors.items():
            pts = [(r["intensity"], r["TFLOPs"]) for r in result["results"] if r["system"] == sys_name and r["shape"] == shape]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=mk, color=col, s=28, label=f"{sys_name} · {shape}")
    ax.set(xscale="log", yscale="log", xlabel="FLOP per byte touched", ylabel="TFLOP/s",
           title=f"MoE experts, {result['dtype']}, {result['device']} ({result['date']}, {result['commit']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)} (default: all; with --dtype fp8, the FP8 checkpoints' two)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8"],
                    help="fp8: the FP8 block-scaled fused MoE against the bf16 one, side by side (moe_kernels_fp8.py)")
    ap.add_argument("--iters", type=int, default=None,
                    help=f"timed iterations per point (median reported; default {ITERS}, {SMOKE_ITERS} with --cpu-smoke)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of each system")
    ap.add_argument("--systems", default=None,
                    help="comma list of the systems to time (default: all; bf16 only): a lease's short plan times "
                    "moelink's alone (the per-expert loop at 16k tokens is minutes)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches only (no CUDA-graph replay)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe_kernels_<gpu>.json); PNG beside it")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
        device, shapes, tokens = torch.device("cpu"), SMOKE_SHAPES, list(SMOKE_TOKENS)
    else:
        device = require_cuda("moe_kernels")
        from .moe_kernels_fp8 import FP8_SHAPES

        names = args.shapes.split(",") if args.shapes else list(FP8_SHAPES if args.dtype == "fp8" else SHAPES)
        unknown = [s for s in names if s not in SHAPES]
        if unknown:
            ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in names}
        tokens = [int(t) for t in args.tokens.split(",")]
    fp8 = args.dtype == "fp8"
    known = set(systems(True))
    only = frozenset(args.systems.split(",")) if args.systems else None
    if only is not None and (fp8 or only - known):
        ap.error(f"--systems: {sorted(only - known) or 'with --dtype fp8'} is not one of {', '.join(sorted(known))} "
                 "(bf16 systems only)")
    dtype = torch.bfloat16 if fp8 else getattr(torch, args.dtype)
    iters = args.iters or (SMOKE_ITERS if args.cpu_smoke else ITERS)
    timer = Timer(device)
    ceilings = measure_ceilings(device, timer)
    print(f"ceilings: {ceilings['copy_GBps']:.0f} GB/s copy, {ceilings['matmul_TFLOPs']:.0f} TFLOP/s bf16 matmul")
    rows = []
    for name, shape in shapes.items():
        if fp8:
            from .moe_kernels_fp8 import bench_fp8_shape

            rows += bench_fp8_shape(name, shape, tokens, device, timer, ceilings, iters, not args.no_check,
                                    not args.no_graphs)
            continue
        rows += bench_shape(name, shape, tokens, dtype, device, timer, ceilings, iters, not args.no_check,
                            not args.no_graphs, only, smoke_tiny() if args.cpu_smoke else None)
    if fp8:
        from .moe_kernels_fp8 import summarize_fp8

        summary = summarize_fp8(rows)
    else:
        summary = summarize(rows)
    result = dict(benchmark="moe_kernels", **run_meta(device), dtype=args.dtype, iters=iters, ceilings=ceilings,
                  timing="median of per-iteration CUDA events, L2 flushed, inputs rotated; median_ms is the CUDA-graph "
                  "replay time where the system can be captured (no host sync), else eager (eager_ms always)"
                  if device.type == "cuda"
                  else "CPU smoke: wall clock in the Triton interpreter, meaningless as speed",
                  results=rows, summary=summary)
    tag = ("cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_")) + ("_fp8" if fp8 else "")
    out = Path(args.out) if args.out else RESULTS / f"moe_kernels_{tag}.json"
    write_result(out, result)
    plotted = not fp8 and plot_roofline(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return result


if __name__ == "__main__":
    main()
