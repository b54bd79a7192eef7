"""The host cost per sequence per decode step on the CPU proxy, side by side with another tree (issue 78).

    python -m moelink.benchmarks.host_per_seq [--seqs 256 1024] [--tokens 64] [--repeats 3]
        [--baseline REV] [--mp] [--out benchmarks/results/host_per_seq_cpu.json]

The proxy (issue 78's acceptance): `LLM.generate` of S sequences x 64 tokens (64-token prompts, greedy, EOS
ignored) on a 1-layer tiny Qwen3-MoE (hidden 64, 8 experts, top-2, float32), after a warm-up batch. Reported per
run: the wall time of that one generate divided by S x tokens (what the issue calls the host cost per sequence
per step: on this proxy the forward is small, so the engine's own work is most of it), the process CPU time the
same way, and, where the engine has one, the part spent in the rank's device work (forward, LM head, sampling:
`runner.stream.submit` timed), so wall - device is the host alone.

Settings, each in a fresh process, alternating within each repeat (medians reported):
- `current`: this checkout, no optional feature;
- `current+features`: this checkout with every optional step feature a request opts into enabled and unused (LoRA
  slots, routed-expert capture; grammars, prompt logprobs and routing replay are always there, woken only by a
  request that asks): their cost when nobody uses them. A KV connector or a drafter is not "unused" once
  configured (every request's KV is saved, every step drafts), so neither is in this set;
- `mp` (with --mp): this checkout, no optional feature, its rank in a process of its own (`executor="mp"`, one
  core left to the driver: `moelink serve`'s default, docs/serving.md#the-rank-process): the driver's scheduling and
  output work beside the rank's input building, forward and sampling instead of before and after them;
- `baseline` (with --baseline REV): the same proxy on another commit, checked out beside this one with
  `git worktree add --detach` and imported in its place (a `moelink` package whose path is that tree).

Ratios printed and saved: baseline / current (how many times cheaper this checkout is; of the medians, and of the
fastest runs, the least disturbed on a shared machine) and current+features / current. The `host` figure (wall
minus device work) means "host alone" only where the device work runs inline: an engine whose CPU stream ran it on
a thread of its own (before 2026-11-28) overlapped the two, and its figure is not comparable. Speed is measured here, never asserted in tests (tests/benchmarks/test_host_per_seq.py runs --dry-run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FEATURES = dict(enable_lora=True, max_loras=2, max_lora_rank=8, enable_return_routed_experts=True)


# -- the worker: one setting, one process (imports only what every tree has: LLM, SamplingParams, the tiny model) --
def _worker(spec: dict) -> dict:
    import torch

    from moelink.engine import LLM, SamplingParams
    from moelink.engine.tools.tiny_model import make_tiny_model

    seqs, tokens = spec["seqs"], spec["tokens"]
    kw = dict(FEATURES) if spec["features"] else {}
    if spec.get("executor"):
        kw.update(executor=spec["executor"], cpu_reserved_cores=1)
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_model(d, arch="qwen3_moe", num_layers=1, hidden_size=64, num_experts=8, top_k=2,
                               max_position_embeddings=4096)
        llm = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=seqs, max_num_batched_tokens=max(8192, seqs),
                  num_kv_blocks=seqs * (-(-(64 + tokens) // 16) + 1), block_size=16, **kw)
        device = _time_device_work(llm)
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": [5 + i % 50] * 64} for i in range(seqs)]
        llm.generate(prompts[: min(8, seqs)], params, use_tqdm=False)  # warm-up
        device[0] = 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        n = seqs * tokens
        return dict(seqs=seqs, tokens=tokens, features=spec["features"], torch_threads=torch.get_num_threads(),
                    wall_s=wall, us_per_seq_step=wall / n * 1e6, cpu_us_per_seq_step=cpu / n * 1e6,
                    device_us_per_seq_step=device[0] / n * 1e6 if device[1] else None,
                    host_us_per_seq_step=(wall - device[0]) / n * 1e6 if device[1] else None)


def _time_device_work(llm) -> list:
    """[seconds in the rank's device work, whether it could be timed]: the runner's stream submit wrapped (a
    thread stream runs it elsewhere: then the figure is the time on that thread)."""
    acc: list = [0.0, False]
    runner = getattr(getattr(getattr(llm.engine, "executor", None), "worker", None), "runner", None)
    stream = getattr(runner, "stream", None)
    if stream is None:
        return acc
    submit = stream.submit

    def timed_submit(fn):
        def timed():
            t = time.perf_counter()
            try:
                return fn()
            finally:
                acc[0] += time.perf_counter() - t
        return submit(timed)
    stream.submit = timed_submit
    acc[1] = True
    return acc


# -- the driver ---------------------------------------------------------------------------------------------------
def _baseline_tree(rev: str, stack: list) -> Path:
    """`rev` checked out beside this tree, and a folder whose `moelink` package is that tree (put on PYTHONPATH)."""
    tree = Path(tempfile.mkdtemp(prefix="moelink-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    stack.append(lambda: subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                        capture_output=True))
    shim = Path(tempfile.mkdtemp(prefix="moelink-shim-")) / "moelink"
    shim.mkdir()
    (shim / "__init__.py").write_text(f"__path__ = [{str(tree)!r}]\n")
    return shim.parent


def _run(spec: dict, pythonpath: str | None, timeout_s: float) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"host_per_seq worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _settings(args) -> list[tuple[str, bool]]:
    names = [("current", False), ("current+features", True)]
    if getattr(args, "mp", False):
        names.append(("mp", False))
    if args.baseline:
        names.insert(0, ("baseline", False))
    return names


def _plan(args) -> list[tuple[int, int, str, bool]]:
    """(repeat, seqs, setting, features) in run order: the settings alternate within each repeat and size."""
    return [(r, s, name, feats) for r in range(args.repeats) for s in args.seqs for name, feats in _settings(args)]


def _summary(runs: list[dict], args) -> dict:
    out: dict = {}
    for seqs in args.seqs:
        row: dict = {}
        for name, _ in _settings(args):
            mine = [r for r in runs if r["seqs"] == seqs and r["setting"] == name]
            row[name] = {k: statistics.median(r[k] for r in mine) if mine and mine[0][k] is not None else None
                         for k in ("us_per_seq_step", "cpu_us_per_seq_step", "host_us_per_seq_step",
                                   "device_us_per_seq_step")}
            # The fastest run too: on a shared machine a run that lost the cores to another process is slower,
            # never faster, so the minimum is the least disturbed figure.
            row[name]["min_us_per_seq_step"] = min(r["us_per_seq_step"] for r in mine)
        cur = row["current"]["us_per_seq_step"]
        row["features_over_current"] = row["current+features"]["us_per_seq_step"] / cur
        if "mp" in row:
            row["current_over_mp"] = cur / row["mp"]["us_per_seq_step"]
            if "baseline" in row:
                row["baseline_over_mp"] = row["baseline"]["us_per_seq_step"] / row["mp"]["us_per_seq_step"]
        if "baseline" in row:
            row["baseline_over_current"] = row["baseline"]["us_per_seq_step"] / cur
            row["baseline_over_current_min"] = (row["baseline"]["min_us_per_seq_step"]
                                                / row["current"]["min_us_per_seq_step"])
        out[str(seqs)] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="a commit to run beside this checkout (e.g. 0b089004)")
    ap.add_argument("--mp", action="store_true", help="also run the proxy with its rank in a process of its own")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="bound on each worker process")
    ap.add_argument("--out", default=str(RESULTS / "host_per_seq_cpu.json"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return {}
    if any(s < 1 for s in args.seqs) or args.tokens < 2 or args.repeats < 1:
        ap.error("--seqs, --tokens (>= 2) and --repeats must be positive")
    plan = _plan(args)
    if args.dry_run:
        for r, s, name, _ in plan:
            print(f"repeat {r}: {name} {s} sequences x {args.tokens} tokens")
        return {"plan": plan}
    from moelink.engine.api.provenance import git_commit, write_result

    cleanup: list = []
    try:
        shim = str(_baseline_tree(args.baseline, cleanup)) if args.baseline else None
        runs = []
        for r, seqs, name, feats in plan:
            spec = dict(seqs=seqs, tokens=args.tokens, features=feats, executor="mp" if name == "mp" else None)
            got = _run(spec, shim if name == "baseline" else None, args.timeout_s)
            got.update(setting=name, repeat=r)
            runs.append(got)
            print(f"repeat {r} {name:>17} {seqs:5d} seqs: {got['us_per_seq_step']:6.1f} us/seq/step "
                  f"(cpu {got['cpu_us_per_seq_step']:.1f}"
                  + (f", host {got['host_us_per_seq_step']:.1f}" if got["host_us_per_seq_step"] is not None else "")
                  + ")", flush=True)
    finally:
        for fn in cleanup:
            fn()
    summary = _summary(runs, args)
    for seqs, row in summary.items():
        line = (f"{seqs} sequences: current {row['current']['us_per_seq_step']:.1f} us/seq/step (median; fastest "
                f"{row['current']['min_us_per_seq_step']:.1f})")
        if "baseline" in row:
            line += (f", baseline {row['baseline']['us_per_seq_step']:.1f} ({row['baseline_over_current']:.2f}x; "
                     f"fastest {row['baseline']['min_us_per_seq_step']:.1f}, {row['baseline_over_current_min']:.2f}x)")
        line += f", with every feature enabled and unused {row['features_over_current']:.2f}x current"
        if "mp" in row:
            line += (f"; mp {row['mp']['us_per_seq_step']:.1f} (current / mp {row['current_over_mp']:.2f}x"
                     + (f", baseline / mp {row['baseline_over_mp']:.2f}x" if "baseline_over_mp" in row else "") + ")")
        print(line)
    result = dict(benchmark="host_per_seq", commit=git_commit(), baseline=args.baseline, tokens=args.tokens,
                  repeats=args.repeats, summary=summary, runs=runs)
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
