"""Tune the Triton MoE launch configs on this GPU and write them as JSON (kernels/configs/).

    python -m moelink.benchmarks.tune_moe [--shapes qwen3-30b-a3b,...] [--tokens 1,16,...]
        [--space quick|full] [--budget-s 540] [--out-dir kernels/configs]

For every shape and token count: for each BLOCK_SIZE_M that fits the rows per
expert, a coordinate search, first over the gate-up GEMM's (BLOCK_N, BLOCK_K,
GROUP_M, warps, stages) with the down GEMM at its default, then over the down
GEMM's with the best gate-up; each candidate timed end to end (the whole fused
MoE, median of CUDA-event times, L2 flushed, rotating inputs). Candidates that
do not compile (shared memory) are skipped. The best per token count goes to
`E={E},N={I},device_name={GPU}.json`, merged into the file that is there, and
written after every token count, so a run cut short by --budget-s keeps what
it finished. moelink.kernels.moe_config reads these files.

`--cpu-smoke` tunes the tiny shapes of moe_kernels.py on CPU (Triton
interpreter) over a two-candidate space, one timed iteration each, into
`--out-dir` (default: a new temporary directory, never kernels/configs): it
checks this script only. Every candidate's output is checked against the
per-expert loop before it is timed; a wrong one is skipped and said so.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .moe_kernels import (SHAPES, SMOKE_SHAPES, SMOKE_TOKENS, TOKENS, Timer, make_inputs, per_expert_loop, require_cuda,
                          run_meta)

SPACES = {
    "quick": dict(BLOCK_SIZE_N=(64, 128), BLOCK_SIZE_K=(64, 128), GROUP_SIZE_M=(1, 16), num_warps=(4, 8), num_stages=(3, 4)),
    "full": dict(BLOCK_SIZE_N=(32, 64, 128, 256), BLOCK_SIZE_K=(32, 64, 128, 256), GROUP_SIZE_M=(1, 8, 16, 32),
                 num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
    # Two candidates per GEMM, blocks no smaller than interpreter.json's: the interpreter's cost grows with programs.
    "smoke": dict(BLOCK_SIZE_N=(32, 64), BLOCK_SIZE_K=(32,), GROUP_SIZE_M=(1,), num_warps=(4,), num_stages=(2,)),
}
ITERS, SMOKE_ITERS = 10, 1


def block_m_candidates(tokens: int, top_k: int, num_experts: int) -> list[int]:
    """M blocks worth trying: up to ~2x the average rows per expert (more is padding), at least 16."""
    rows = tokens * top_k / num_experts
    cands = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * rows)]
    return cands[-2:]


def gemm_candidates(space: dict):
    from moelink.kernels.moe_config import GemmConfig

    keys = list(space)
    for vals in itertools.product(*(space[k] for k in keys)):
        yield GemmConfig(**dict(zip(keys, vals)))


def time_config(cfg, sets, timer, iters, want=None) -> float:
    """Median seconds of `cfg`; inf if it does not compile or (with `want`, the per-expert loop's output
    on sets[0]) computes something else: a fast wrong config must never be written."""
    from moelink.kernels.triton_moe import triton_fused_moe

    fn = lambda x, w13, w2, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, config=cfg)  # noqa: E731
    try:
        if want is not None:
            err = float((fn(*sets[0]).float() - want).norm() / want.norm())
            if not err <= 2e-2:  # a NaN fails too
                print(f"  skipped {json.dumps(cfg.to_dict())}: relative error {err:.3g} against the per-expert loop")
                return float("inf")
        return timer(fn, sets, iters=iters, warmup=1)
    except Exception as e:  # noqa: BLE001 - triton raises several kinds (OutOfResources, CompilationError)
        if "out of resource" in str(e).lower() or "OutOfResources" in type(e).__name__ or "Compilation" in type(e).__name__:
            return float("inf")
        raise


def tune_bucket(shape, T, dtype, device, timer, space, iters, deadline):
    from moelink.kernels.moe_config import MoEConfig, get_moe_config

    E, K, D, I = shape
    gen = torch.Generator(device=device).manual_seed(T)
    # Rotating inputs keeps them out of a GPU's L2; the CPU interpreter has no cache to defeat (and a call costs ~0.2 s).
    sets = make_inputs(E, K, D, I, T, dtype, device, gen, n_sets=2 if device.type == "cuda" else 1)
    base = get_moe_config(E, I, T, K, device)
    want = per_expert_loop(*sets[0]).float()
    best, best_t = None, float("inf")
    for bm in block_m_candidates(T, K, E):
        if time.monotonic() > deadline:  # else a bucket past the budget would be "tuned" to the default config
            break
        cur = MoEConfig(bm, base.up, base.down)
        cur_t = time_config(cur, sets, timer, iters, want)
        for part in ("up", "down"):
            for g in gemm_candidates(space):
                if time.monotonic() > deadline:
                    break
                cand = replace(cur, **{part: g})
                t = time_config(cand, sets, timer, iters, want)
                if t < cur_t:
                    cur, cur_t = cand, t
        if cur_t < best_t:
            best, best_t = cur, cur_t
    return best, best_t


def main(argv=None) -> dict[str, dict]:
    """Returns {config file path: {tokens: MoEConfig}}, the buckets tuned in this run."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token-count buckets")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--space", default="quick", choices=sorted(SPACES), help="search space per GEMM")
    ap.add_argument("--iters", type=int, default=None,
                    help=f"timed iterations per candidate (default {ITERS}, {SMOKE_ITERS} with --cpu-smoke)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop after this many seconds (results so far are kept)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default: the package's kernels/configs)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes, tokens, space = torch.device("cpu"), SMOKE_SHAPES, list(SMOKE_TOKENS), SPACES["smoke"]
    else:
        device = require_cuda("tune_moe")
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        tokens, space = [int(t) for t in args.tokens.split(",")], SPACES[args.space]
    from moelink.kernels.moe_config import CONFIG_DIR, config_file_name, device_name, load_config_file, write_config_file

    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.cpu_smoke:  # never next to the real configs: the package data would ship it
        out_dir = Path(tempfile.mkdtemp(prefix="moelink-tune-smoke-"))
    else:
        out_dir = CONFIG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (SMOKE_ITERS if args.cpu_smoke else ITERS)
    timer = Timer(device)
    deadline = time.monotonic() + args.budget_s
    meta = run_meta(device)
    tuned: dict[str, dict] = {}
    for name, (E, K, D, I) in shapes.items():
        path = out_dir / config_file_name(E, I, device_name(device))
        found = load_config_file(str(path))
        configs = dict(found[1]) if found and found[0] == "tokens" else {}
        for T in tokens:
            best, t = tune_bucket((E, K, D, I), T, dtype, device, timer, space, iters, deadline)
            if best is None:  # past the deadline, or every candidate failed to compile or gave wrong results
                why = ("out of time budget" if time.monotonic() > deadline
                       else "no candidate config compiled and gave correct results")
                print(f"{name} T={T}: {why}, not tuned")
                continue
            configs[T] = best
            write_config_file(path, configs, meta=dict(shape=dict(model=name, E=E, top_k=K, D=D, I=I), dtype=args.dtype,
                                                       tuned_on=meta["device"], date=meta["date"], commit=meta["commit"]))
            tuned.setdefault(str(path), {})[T] = best
            cut = " (search cut short by --budget-s: best found so far)" if time.monotonic() > deadline else ""
            print(f"{name} T={T}: {t * 1e3:.3f} ms with {json.dumps(best.to_dict())}{cut}", flush=True)
        print(f"wrote {path}" if str(path) in tuned else f"{name}: nothing tuned, {path} left as it was")
    return tuned


if __name__ == "__main__":
    main()
