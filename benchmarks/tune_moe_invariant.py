"""The one launch config the batch-invariant mode's fused MoE runs at every token count, tuned on this GPU.

    python -m moelink.benchmarks.tune_moe_invariant --shapes qwen3-30b-a3b [--tokens 32,256,2048]
        [--weights 32,4,1] [--budget-s 400] [--out-dir DIR] [--cpu-smoke]

The mode (kernels/batch_invariant_triton.py) keeps a token's expert outputs the same bits in any batch by running
one config whatever the batch (no per-bucket table, no tiny path, the ordered "sum" combine): the built-in one
(64-row blocks, 64 x 64 tiles) was chosen without a GPU. This searches that one config on the GPU: a candidate's
cost is the weighted sum of its times at the mix's token counts (decode batches and prefill chunks, weighted by how
many steps of each a workload runs; default: every count once), timed as the mode runs it (sorted path, "sum"
combine; CUDA-graph replays at decode sizes, as tune_moe), each checked against the per-expert loop. The search is
tune_moe's (`tune_bucket`: seeds, one axis at a time, a head-to-head confirmation against the best seed), with the
M blocks of every count in the mix and never the tiny path. Seeds: the built-in config, and at each count the
config the normal engine's table runs there (without its tiny path).

Output: `batch_invariant,E={E},N={I},device_name={GPU}.json` (one config) in --out-dir (default kernels/configs),
which the mode reads for that shape on that GPU; its `tuning` records per count the tuned config's time, the
built-in one's and the normal engine's (its table's config for that count, tiny path included), and a RATIO line
per count says what the mode's experts cost against the normal engine's (issue 80: the mode at <= 1.10x).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from .moe_kernels import Timer, make_inputs, per_expert_loop, require_cuda, run_meta
from .tune_moe import Bf16Kind, GraphTiming, unique_seeds
from .tune_space import TINY_TUNE_MAX_PAIRS
from .tune_timing import time_call, time_config

DEFAULT_TOKENS = (32, 256, 2048)  # a decode batch, a large decode batch, a prefill chunk


def invariant_time(cfg, sets, timer, iters, want=None) -> float:
    """Seconds of `cfg` on the mode's path (sorted, ordered sum), inf on a failure or a wrong result."""
    from moelink.kernels.triton_moe import triton_fused_moe

    fn = lambda x, w13, w2, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, config=cfg, combine="sum",  # noqa: E731
                                                     path="sorted")
    return time_call(fn, cfg, sets, timer, iters, want)


class InvariantKind(Bf16Kind):
    """tune_moe's bf16 kind (tune_bucket's hooks; its pruning and launch as they are) for one config over a mix of
    token counts: its "inputs" are every count's, its time the weighted sum of theirs, its seeds its own."""

    tiny = False  # the mode never takes the tiny path

    def __init__(self, tokens: list[int], weights: list[float], smoke: bool = False):
        super().__init__(smoke)
        self.tokens, self.weights = tokens, weights
        self.mix: list = []

    def inputs(self, shape, T, dtype, device, gen, n_sets):
        """([(count, its input sets, the per-expert loop's output on the first)] for every count of the mix, None):
        one copy of the expert weights for all of them (DeepSeek-V3's are 22 GB)."""
        E, K, D, I = shape
        out, weights = [], None
        for t in self.tokens:
            sets = make_inputs(E, K, D, I, t, dtype, device, gen, n_sets=n_sets, weights=weights)
            weights = sets[0][1], sets[0][2]
            out.append((t, sets, per_expert_loop(*sets[0]).float()))
        self.mix = out  # the search's inputs, which the record after it times again (no second draw)
        return out, None

    @staticmethod
    def timer_for(timer, T, K, device):
        """CUDA-graph replays at decode sizes, as tune_moe times a decode bucket (tune_bucket may hand over a
        GraphTiming already when the mix's largest count is decode-sized)."""
        base = timer.timer if isinstance(timer, GraphTiming) else timer
        return GraphTiming(base) if device.type == "cuda" and T * K <= TINY_TUNE_MAX_PAIRS else base

    def each(self, cfg, mix, timer, iters, time_fn=invariant_time) -> list[float]:
        """Seconds of `cfg` at each count of the mix (inf where it fails)."""
        out = []
        for T, sets, want in mix:
            K = sets[0][3].shape[1]
            out.append(time_fn(cfg, sets, self.timer_for(timer, T, K, sets[0][0].device), iters, want))
            if out[-1] == float("inf"):
                break
        return out + [float("inf")] * (len(mix) - len(out))

    def time(self, cfg, mix, timer, iters, want=None) -> float:
        return sum(w * t for w, t in zip(self.weights, self.each(cfg, mix, timer, iters)))

    def seeds(self, shape, T, device):
        """The built-in config, then the normal table's config at each count of the mix (its tiny path off)."""
        from dataclasses import replace

        from moelink.kernels.batch_invariant_triton import builtin_moe_config
        from moelink.kernels.moe_config import get_moe_config

        E, K, D, I = shape
        out = [("built-in", builtin_moe_config(device.type == "cuda", torch.bfloat16))]
        out += [(f"table[{t}]", replace(get_moe_config(E, I, t, K, device), tiny=None)) for t in self.tokens]
        return unique_seeds(out)


def _parser() -> argparse.ArgumentParser:
    from .tune_space import SPACES

    ap = argparse.ArgumentParser(prog="python -m moelink.benchmarks.tune_moe_invariant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list of tune_moe's shapes (default: all; --cpu-smoke: its)")
    ap.add_argument("--tokens", default=None, help="comma list of the token counts the one config runs at (default: "
                    f"{','.join(map(str, DEFAULT_TOKENS))})")
    ap.add_argument("--weights", default=None, help="comma list, one weight per --tokens count: how many steps of "
                                                    "each a workload runs (default: 1 each)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="the experts' dtype (float32 and quantized experts keep the mode's built-in configs)")
    ap.add_argument("--space", default="quick", choices=sorted(SPACES), help="values per axis and sweeps")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per candidate and count")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop searching after this many seconds")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default: the package's kernels/configs)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    return ap


def _weights(ap: argparse.ArgumentParser, text: str | None, tokens: list[int]) -> list[float]:
    if text is None:
        return [1.0] * len(tokens)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(tokens) or min(weights, default=-1.0) <= 0:
        ap.error(f"--weights {text!r} is invalid: give one positive number per --tokens count ({len(tokens)}).")
    return weights


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """{file path: {first count: config}} of what it wrote."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.cpu_smoke:  # before moelink.kernels' Triton modules are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from moelink.kernels.batch_invariant_triton import invariant_file_name
    from moelink.kernels.moe_config import CONFIG_DIR, device_name, get_moe_config, write_config_file

    from .moe_kernels import SHAPES, SMOKE_SHAPES, SMOKE_TOKENS
    from .tune_moe import ITERS, SMOKE_ITERS, SPACES, print_bucket, tune_bucket, tuning_row

    known = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    names = args.shapes.split(",") if args.shapes else list(known)
    unknown = [s for s in names if s not in known]
    if unknown:
        ap.error(f"--shapes: {unknown[0]!r} is not one of {', '.join(known)}")
    try:
        tokens = ([int(t) for t in args.tokens.split(",")] if args.tokens
                  else list(SMOKE_TOKENS if args.cpu_smoke else DEFAULT_TOKENS))
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens: {args.tokens!r} is not a comma list of positive integers")
    kind = InvariantKind(tokens, _weights(ap, args.weights, tokens), args.cpu_smoke)
    if args.cpu_smoke:
        device, space = torch.device("cpu"), SPACES["smoke"]
    else:
        device, space = require_cuda("tune_moe_invariant"), SPACES[args.space]
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="moelink-tune-smoke-")) if args.cpu_smoke else CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (SMOKE_ITERS if args.cpu_smoke else ITERS)
    timer, meta, written = Timer(device), run_meta(device), {}
    end = time.monotonic() + args.budget_s
    for i, name in enumerate(names):
        E, K, D, I = known[name]
        deadline = time.monotonic() + max(0.0, end - time.monotonic()) / (len(names) - i)
        # Run as the mix's largest count: its M blocks are every count's (block_m_candidates grows with the count).
        best, t, info = tune_bucket((E, K, D, I), max(tokens), dtype, device, timer, space, iters, deadline, kind=kind)
        if best is None:
            print(f"{name}: no candidate config compiled and gave correct results in time, nothing written")
            continue
        # The record, on the search's inputs: per count, the tuned config, the built-in one and the normal engine's
        # (its table, tiny path included: what the mode's experts are measured against).
        mix, kind.mix = kind.mix, []
        tuned = kind.each(best, mix, timer, iters)
        builtin = kind.each(kind.seeds((E, K, D, I), 0, device)[0][1], mix, timer, iters)
        normal = [time_config(get_moe_config(E, I, T, K, device), sets, kind.timer_for(timer, T, K, device), iters, want)
                  for T, sets, want in mix]
        per_count = {str(T): dict(tuned_ms=round(a * 1e3, 4), builtin_ms=round(b * 1e3, 4), normal_ms=round(c * 1e3, 4))
                     for T, a, b, c in zip(tokens, tuned, builtin, normal)}
        path = out_dir / invariant_file_name(E, I, device_name(device))
        write_config_file(path, {tokens[0]: best}, meta=dict(
            shape=dict(model=name, E=E, top_k=K, D=D, I=I), dtype=args.dtype, batch_invariant=True,
            mix=dict(tokens=tokens, weights=kind.weights), tuned_on=meta["device"], date=meta["date"],
            commit=meta["commit"], triton=meta["triton"], tuning=dict(tuning_row(info), per_count=per_count)))
        written[str(path)] = {tokens[0]: best}
        print_bucket(name, max(tokens), t, best, info, deadline)
        for T, row in per_count.items():
            print(f"RATIO {name} T={T}: invariant {row['tuned_ms']:.4f} ms / normal {row['normal_ms']:.4f} ms = "
                  f"{row['tuned_ms'] / row['normal_ms']:.3f} (built-in {row['builtin_ms']:.4f} ms)", flush=True)
        print(f"wrote {path}")
    return written


__all__ = ["DEFAULT_TOKENS", "InvariantKind", "invariant_time", "main"]


if __name__ == "__main__":
    main()
