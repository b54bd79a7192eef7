"""Tune the Triton MoE launch configs on this GPU and write them as JSON (kernels/configs/).

    python -m moelink.benchmarks.tune_moe [--shapes qwen3-30b-a3b,...] [--tokens 1,16,...] [--dtype bfloat16|fp8|mxfp4]
        [--space quick|full] [--budget-s 480] [--out-dir kernels/configs] [--merge-from DIR]

Per shape and token count (a "bucket"):
1. Seeds: the config moelink uses now for this bucket (a tuned file's, if there is one), the one it would
   use with no tuned file (default.json), and published tuned configs for the same shape (PUBLISHED
   below, translated to this kernel). Each is timed; the fastest is "the seed".
2. A coordinate search from the seed over a pruned space (benchmarks/tune_space.py): one axis at a time
   (BLOCK_SIZE_M, then each GEMM's BLOCK_N, BLOCK_K, GROUP_M, warps, stages, its tile schedule PERSISTENT
   (programs per SM of the persistent tile loop, 0 = one program per tile) and TMA (tensor-descriptor loads),
   and the gate-up GEMM's FUSED_GATE_UP: one interleaved gate|up tile and one dot of twice the width), and at <= TINY_TUNE_MAX_PAIRS pairs the tiny-batch path
   (TINY: on with max_pairs = this bucket's T*K, then its GEMV blocks and warps), each other value of that axis tried, the first that
   is faster by more than NOISE kept; up to `passes` sweeps while anything improves. Candidates that cannot
   fit (shared memory of the pipeline, accumulator registers per thread, blocks wider than the matrix)
   are pruned before they are compiled. A candidate that fails for any reason (compile error, out of
   resources, a launch error, a wrong result against the per-expert loop) is skipped and the reason
   printed; a CUDA fault that poisons the context stops the run.
3. The search's best and the seed are re-timed head to head (CONFIRM_ROUNDS interleaved rounds); the search's
   best is written only if it is faster there too, else the seed is written: a bucket never gets a config
   slower than the seed.
Each bucket gets an equal share of what is left of --budget-s, so a slow bucket cannot starve the later
ones; the file is rewritten after every bucket, so a run cut short keeps what it finished. Timing is the
whole fused MoE, median of CUDA-event times, L2 flushed, inputs rotated (moe_kernels.Timer); buckets of at
most TINY_TUNE_MAX_PAIRS pairs are timed as CUDA-graph replays (GraphTiming), as the engine decodes.

Output: `E={E},N={I},device_name={GPU}.json` in --out-dir (default kernels/configs), merged into the file
there, or, when --out-dir has none, into the same-named file in --merge-from (default: kernels/configs), so
a staging directory (benchmarks/gpu_session.sh tune) still keeps the buckets it did not re-tune. The file
records per bucket the seed, its time and the tuned time ("tuning"). moelink.kernels.moe_config reads it.

`--dtype fp8` tunes the FP8 block-scaled fused MoE the same way (benchmarks/tune_moe_fp8.py: its inputs, seeds,
pruning, reference and `fp8_w8a8,E=..,N=..,device_name=..json` files, a RATIO line against bf16 per bucket); the
parts that differ are a "kind" (Bf16Kind here, tune_moe_fp8.Fp8Kind) that tune_bucket and main call. `--dtype mxfp4`
tunes gpt-oss's MXFP4 experts (benchmarks/tune_moe_mxfp4.py: per-tile against dequantize-once per bucket, then
the per-tile blocks; `mxfp4,E=..,N=..,device_name=..json`, a RATIO line against bf16 per bucket).
The batch-invariant mode's one config (every token count runs it) has a tuner of its own built on this one's search:
benchmarks/tune_moe_invariant.py.

`--cpu-smoke` tunes the tiny shapes of moe_kernels.py on CPU (Triton interpreter) over a tiny space, one
timed iteration each, into `--out-dir` (default: a new temporary directory, never kernels/configs): it
checks this script only.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .tune_space import (DOWN_AXES, GEMM_AXES, MAX_ACC_REGS, MAX_TINY_DOWN_VALUES, MAX_TINY_UP_VALUES,  # noqa: F401
                         PUBLISHED, SCHEDULE_AXES, SMEM_LIMIT, SMOKE_TINY_FLOAT, SPACES, TINY_AXES, TINY_TUNE_MAX_PAIRS,
                         UP_AXES, block_m_candidates, feasible, from_vllm, gemm_fits, neighbours, published_seeds,
                         tiny_neighbours)
from .tune_timing import CudaFault, _is_cuda_fault, time_call, time_config  # noqa: F401
from .moe_kernels import (SHAPES, SMOKE_SHAPES, SMOKE_TOKENS, TOKENS, Timer, make_inputs, per_expert_loop, require_cuda,
                          run_meta)

ITERS, SMOKE_ITERS = 10, 1
NOISE = 0.01  # a candidate must beat the current best by more than this fraction to replace it
CONFIRM_ROUNDS = 3


class GraphTiming:
    """A Timer that times CUDA-graph replays (how the engine runs decode steps), eager where a capture fails:
    at decode sizes eager timing is mostly host launch cost, which would favour whichever path launches less."""

    def __init__(self, timer):
        self.timer = timer

    def __call__(self, fn, arg_sets, iters: int = 30, warmup: int = 3) -> float:
        t = self.timer.graph(fn, arg_sets, iters=iters)
        return t if t is not None else self.timer(fn, arg_sets, iters=iters, warmup=warmup)


def confirm(best, best_t, seed, seed_t, sets, timer, iters, rounds=CONFIRM_ROUNDS, time_fn=None):
    """Head-to-head re-timing of the search's best against the seed, interleaved; returns (config, seconds, seconds
    of the seed): the seed unless the best is faster in the median of `rounds` rounds. `time_fn`: time_config's
    signature (default time_config)."""
    if best == seed:
        return seed, seed_t, seed_t
    time_fn = time_fn or time_config
    tb, ts = [], []
    for _ in range(rounds):
        ts.append(time_fn(seed, sets, timer, iters))
        tb.append(time_fn(best, sets, timer, iters))
    mb, ms = sorted(tb)[len(tb) // 2], sorted(ts)[len(ts) // 2]
    return (best, mb, ms) if mb < ms else (seed, ms, ms)


def seeds_for(shape, T, device):
    """[(label, MoELaunchConfig)], duplicates removed, in order: current, default.json, published."""
    from moelink.kernels.moe_config import default_config, get_moe_config

    E, K, D, I = shape
    out = [("current", get_moe_config(E, I, T, K, device)), ("default.json", default_config(E, I, T, K))]
    out += [(f"{src}[{b}]", cfg) for b, cfg, src in published_seeds(E, I, D, T)]
    return unique_seeds(out)


def unique_seeds(labelled):
    """[(label, config)] with later duplicates of a config dropped, in order."""
    seen, uniq = set(), []
    for label, cfg in labelled:
        if cfg not in seen:
            seen.add(cfg)
            uniq.append((label, cfg))
    return uniq


class Bf16Kind:
    """What tune_bucket tunes and how (tune_moe_fp8.Fp8Kind is the FP8 one): the bf16/fp16 fused MoE of
    kernels/triton_moe.py, checked against the per-expert loop, its configs as they are written."""

    tiny = True  # the tiny-batch path is an axis

    def __init__(self, smoke: bool = False):
        self.smoke = smoke

    @property
    def tiny_start(self):
        """The tiny path's blocks where the search turns it on (None: DEFAULT_TINY_FLOAT); the CPU smoke's are wider."""
        from moelink.kernels.moe_config import TinyConfig

        return TinyConfig.from_dict(SMOKE_TINY_FLOAT) if self.smoke else None

    def inputs(self, shape, T, dtype, device, gen, n_sets):
        E, K, D, I = shape
        sets = make_inputs(E, K, D, I, T, dtype, device, gen, n_sets=n_sets)
        return sets, per_expert_loop(*sets[0]).float()

    def time(self, cfg, sets, timer, iters, want=None) -> float:
        return time_config(cfg, sets, timer, iters, want)

    def seeds(self, shape, T, device):
        return seeds_for(shape, T, device)

    def launched(self, cfg):
        """The config as the wrapper launches it (candidates that launch the same are timed once)."""
        return cfg

    def feasible(self, cfg, shape, dtype):
        E, K, D, I = shape
        return feasible(cfg, D, I, dtype.itemsize, K)

    def compare(self, shape, T, sets, timer, iters) -> dict:
        """Extra numbers for the bucket's record, timed on the same inputs (the FP8 kind: bf16's time)."""
        return {}

    # -- what main needs besides tune_bucket
    def shapes(self, smoke: bool) -> dict:
        return SMOKE_SHAPES if smoke else SHAPES

    def space(self, name: str) -> dict:
        return SPACES[name]

    def file_name(self, E: int, I: int, device) -> str:
        from moelink.kernels.moe_config import config_file_name, device_name

        return config_file_name(E, I, device_name(device))

    def meta(self, args) -> dict:
        return dict(dtype=args.dtype)

    def fallback(self, shape, device, tokens) -> dict:
        """{bucket: config} a new file starts with (buckets this run does not tune keep them): none for bf16."""
        return {}


def tune_bucket(shape, T, dtype, device, timer, space, iters, deadline, log=print, tiny_axes=None, kind=None):
    """(best MoELaunchConfig, its seconds, info dict) or (None, inf, info) when nothing could be timed in time."""
    kind = kind or Bf16Kind()
    E, K, D, I = shape
    gen = torch.Generator(device=device).manual_seed(T)
    # Rotating inputs keeps them out of a GPU's L2; the CPU interpreter has no cache to defeat (and a call costs ~0.2 s).
    sets, want = kind.inputs(shape, T, dtype, device, gen, 2 if device.type == "cuda" else 1)
    if device.type == "cuda" and T * K <= TINY_TUNE_MAX_PAIRS:  # decode-sized: what a decode graph replays
        timer = GraphTiming(timer)
    info = dict(tried=0, pruned=0, failed=0, same=0)
    info.update(kind.compare(shape, T, sets, timer, iters))
    seen: dict = {}

    def measure(cfg) -> float:
        if cfg not in seen:
            seen[cfg] = kind.time(cfg, sets, timer, iters, want)
            info["tried"] += 1
            info["failed"] += seen[cfg] == float("inf")
        return seen[cfg]

    seed, seed_t, seed_label = None, float("inf"), None
    for label, cfg in kind.seeds(shape, T, device):
        if time.monotonic() > deadline:
            break
        t = measure(cfg)
        log(f"  seed {label}: {t * 1e3:.3f} ms {json.dumps(cfg.to_dict())}")
        if t < seed_t:
            seed, seed_t, seed_label = cfg, t, label
    if seed is None:
        return None, float("inf"), info
    cur, cur_t = seed, seed_t
    bms = block_m_candidates(T, K, E, space)
    for _ in range(space.get("passes", 1)):
        improved = False
        for cand in neighbours(cur, space, bms, T * K, tiny_axes, getattr(kind, "tiny_start", None)):
            if time.monotonic() > deadline:
                break
            launched = kind.launched(cand)
            if launched in seen:
                info["same"] += launched != cand  # a value the wrapper overrides: the same launch as one timed
                continue
            cand = launched
            # (a seed can break a rule, e.g. default.json's 64-wide blocks on a 32-wide smoke GEMM: then its
            # neighbours are not held to the rules it breaks)
            why = kind.feasible(cand, shape, dtype)
            if why and kind.feasible(cur, shape, dtype) is None:
                info["pruned"] += 1
                continue
            t = measure(cand)
            if t < cur_t * (1 - NOISE):
                cur, cur_t, improved = cand, t, True
        if not improved or time.monotonic() > deadline:
            break
    best, best_t, seed_t2 = confirm(cur, cur_t, seed, seed_t, sets, timer, iters,
                                    space.get("confirm_rounds", CONFIRM_ROUNDS), kind.time)
    info.update(seed=seed_label, seed_config=seed.to_dict(), seed_ms=round(seed_t2 * 1e3, 4),
                tuned_ms=round(best_t * 1e3, 4), kept_seed=best == seed)
    return best, best_t, info


def main(argv=None) -> dict[str, dict]:
    """Returns {config file path: {tokens: MoELaunchConfig}}, the buckets tuned in this run."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.dtype == "fp8":
        from .tune_moe_fp8 import Fp8Kind

        kind = Fp8Kind(smoke=args.cpu_smoke)
    elif args.dtype == "mxfp4":
        from .tune_moe_mxfp4 import Mxfp4Kind

        kind = Mxfp4Kind()
    else:
        kind = Bf16Kind(smoke=args.cpu_smoke)
    shapes, tokens = _shapes_and_tokens(ap, args, kind)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, space = torch.device("cpu"), kind.space("smoke")
    else:
        device = require_cuda("tune_moe")
        space = kind.space(args.space)
    from moelink.kernels.moe_config import CONFIG_DIR, load_config_file, write_config_file

    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.cpu_smoke:  # never next to the real configs: the package data would ship it
        out_dir = Path(tempfile.mkdtemp(prefix="moelink-tune-smoke-"))
    else:
        out_dir = CONFIG_DIR
    merge_dir = Path(args.merge_from) if args.merge_from else CONFIG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    # (fp8, mxfp4: the activations' dtype)
    dtype = torch.bfloat16 if args.dtype in ("fp8", "mxfp4") else getattr(torch, args.dtype)
    iters = args.iters or (SMOKE_ITERS if args.cpu_smoke else ITERS)
    tiny_axes = TINY_AXES["smoke" if args.cpu_smoke else args.space] if kind.tiny else None
    timer = Timer(device)
    end = time.monotonic() + args.budget_s
    meta = run_meta(device)
    tuned: dict[str, dict] = {}
    n_left = len(shapes) * len(tokens)
    for name, (E, K, D, I) in shapes.items():
        path = out_dir / kind.file_name(E, I, device)
        src = path if path.is_file() else merge_dir / path.name
        found = load_config_file(str(src))
        configs = dict(found[1]) if found and found[0] == "tokens" else {}
        tuning = json.loads(src.read_text()).get("tuning", {}) if found else {}
        if found and src != path:
            print(f"{name}: merging into {src}'s {len(configs)} buckets")
        # A new file stands for every token count: buckets this run leaves untuned keep what was used until now.
        fallback = {} if found else kind.fallback((E, K, D, I), device, SMOKE_TOKENS if args.cpu_smoke else TOKENS)
        if set(fallback) - set(tokens):
            print(f"{name}: buckets {sorted(set(fallback) - set(tokens))} are not tuned in this run: they keep the "
                  "config used until now")
        for T in tokens:
            now = time.monotonic()
            deadline = now + max(0.0, end - now) / n_left  # an equal share of what is left
            n_left -= 1
            if now > end:
                print(f"{name} T={T}: out of time budget, not tuned")
                continue
            best, t, info = tune_bucket((E, K, D, I), T, dtype, device, timer, space, iters, deadline,
                                        tiny_axes=tiny_axes, kind=kind)
            if best is None:
                why = ("out of time budget" if time.monotonic() > deadline
                       else "no candidate config compiled and gave correct results")
                print(f"{name} T={T}: {why}, not tuned")
                continue
            configs[T] = best
            tuning[str(T)] = tuning_row(info)
            write_config_file(path, {**fallback, **configs},
                              meta=dict(shape=dict(model=name, E=E, top_k=K, D=D, I=I), **kind.meta(args),
                                        tuned_on=meta["device"], date=meta["date"], commit=meta["commit"],
                                        triton=meta["triton"], tuning={k: tuning[k] for k in sorted(tuning, key=int)}))
            tuned.setdefault(str(path), {})[T] = best
            print_bucket(name, T, t, best, info, deadline, args.dtype)
        print(f"wrote {path}" if str(path) in tuned else f"{name}: nothing tuned, {path} left as it was")
    return tuned


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)} (default: all; with --cpu-smoke: of {', '.join(SMOKE_SHAPES)})")
    ap.add_argument("--tokens", default=None, help="comma list of token-count buckets (default: "
                    f"{','.join(map(str, TOKENS))}; with --cpu-smoke {','.join(map(str, SMOKE_TOKENS))})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8", "mxfp4"],
                    help="fp8: the FP8 block-scaled fused MoE (W8A8, 128x128 weight blocks; tune_moe_fp8.py) against "
                    "the bf16 one, into fp8_w8a8,E=..,N=..,device_name=..json; mxfp4: gpt-oss's MXFP4 experts "
                    "(tune_moe_mxfp4.py) against bf16, into mxfp4,E=..,N=..,device_name=..json")
    ap.add_argument("--space", default="quick", choices=sorted(SPACES), help="values per axis and sweeps")
    ap.add_argument("--iters", type=int, default=None,
                    help=f"timed iterations per candidate (default {ITERS}, {SMOKE_ITERS} with --cpu-smoke)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop after this many seconds (results so far are kept)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default: the package's kernels/configs)")
    ap.add_argument("--merge-from", default=None,
                    help="where an existing file to merge into is read when --out-dir has none (default: kernels/configs)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    return ap


def _shapes_and_tokens(ap: argparse.ArgumentParser, args: argparse.Namespace, kind) -> tuple[dict, list[int]]:
    """The shapes and token-count buckets to tune, from the command line (argparse's error on an unknown shape or a
    bad bucket list)."""
    known = kind.shapes(args.cpu_smoke)
    names = args.shapes.split(",") if args.shapes else list(known)
    unknown = [s for s in names if s not in known]
    if unknown:
        ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(known)}")
    shapes = {s: known[s] for s in names}
    try:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(SMOKE_TOKENS if args.cpu_smoke else TOKENS)
    except ValueError:
        ap.error(f"--tokens: {args.tokens!r} is not a comma list of positive integers")
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens: {args.tokens!r} is not a comma list of positive integers")
    return shapes, tokens


def tuning_row(info: dict) -> dict:
    """What the config file records of one bucket's search (its `tuning` entry)."""
    row = dict(seed=info["seed"], seed_ms=info["seed_ms"], tuned_ms=info["tuned_ms"],
               tried=info["tried"], failed=info["failed"], pruned=info["pruned"])
    if info["same"]:  # (FP8: candidates the wrapper launches as one already timed)
        row["same_launch"] = info["same"]
    if "bf16_ms" in info:
        row["bf16_ms"] = info["bf16_ms"]
    return row


def print_bucket(name: str, T: int, t: float, best, info: dict, deadline: float, fmt: str = "fp8") -> None:
    """One tuned bucket: its search, its result, and under FP8 and MXFP4 (`fmt`) the ratio to the bf16 MoE."""
    cut = " (search cut short by its share of --budget-s: best found so far)" if time.monotonic() > deadline else ""
    kept = "the seed, nothing beat it" if info["kept_seed"] else f"{info['seed_ms'] / info['tuned_ms']:.3f}x the seed"
    print(f"  {name} T={T}: seed {info['seed']} {info['seed_ms']:.3f} ms; {info['tried']} timed, "
          f"{info['failed']} failed, {info['pruned']} pruned; kept {kept}{cut}")
    print(f"{name} T={T}: {t * 1e3:.3f} ms with {json.dumps(best.to_dict())}", flush=True)
    if "bf16_ms" in info:  # the goal is this ratio (issue 31: bf16/fp8 >= 1.5 at 4096-16384 tokens)
        print(f"RATIO {name} T={T}: {fmt} {t * 1e3:.4f} ms / bf16 {info['bf16_ms']:.4f} ms = "
              f"{t * 1e3 / info['bf16_ms']:.3f} (bf16/{fmt} {info['bf16_ms'] / (t * 1e3):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
