"""Fault injection under elastic EP on CPU: SIGKILL one rank mid-stream, print time-to-recover and tokens/s
before, during and after.

    python -m moelink.benchmarks.elastic_fault [--ep 4] [--num-requests 64] [--max-tokens 64] [--out benchmarks/results/elastic_fault_cpu.json]

An EP N engine (`--elastic-ep`, Ray, gloo, a tiny random Qwen3-MoE in float32) serves `--num-requests`
concurrent greedy requests; once a third of the tokens are out, the process of rank 1 is SIGKILLed. Each
step's time and tokens are recorded; "during" is the step that lost the rank plus the recovery and the
recompute of every requeued request (until the tokens/s of a window of steps is back to the after-phase's),
so read it as the pause clients see. The JSON holds the per-step series; `--plot` draws tokens/s over time.
On a 2-core machine the ranks share the cores: the after-phase at EP N-1 is not slower for the lost rank's
compute, read the numbers as the recovery's cost, not as GPU behaviour.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from datetime import date
from pathlib import Path

from moelink.engine.provenance import git_commit as _commit

MODEL_KW = dict(arch="qwen3_moe", num_layers=2, hidden_size=128, num_experts=16, top_k=4, num_heads=4,
                num_kv_heads=2, head_dim=32, moe_intermediate_size=128, vocab_size=512)


def run(ep: int, num_requests: int, max_tokens: int) -> dict:
    from moelink.engine import EngineArgs, SamplingParams
    from moelink.engine.llm_engine import LLMEngine
    from moelink.engine.tiny_model import make_tiny_model

    path = make_tiny_model(Path(tempfile.mkdtemp(prefix="elastic-bench-")) / "m", **MODEL_KW)
    eng = LLMEngine(EngineArgs(model=str(path), dtype="float32", expert_parallel_size=ep, elastic_ep=True,
                               max_num_seqs=num_requests, num_kv_blocks=1024).create_engine_config())
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i in range(num_requests):
            eng.add_request(f"r{i}", [(7 * i + j) % 500 + 3 for j in range(8 + i % 8)], params)
        total, done, killed_at, steps = num_requests * max_tokens, 0, None, []
        t_start = time.monotonic()
        while eng.has_requests():
            if killed_at is None and done >= total // 3:
                killed_at = time.monotonic() - t_start
                os.kill(eng.executor.rank_pids[1], signal.SIGKILL)
            unfinished = sum(s.num_running + s.num_waiting for s in eng.rank_stats())
            t0 = time.monotonic()
            n = len(eng.step())  # one new token per output (no speculative decoding)
            done += n
            steps.append((t0 - t_start, time.monotonic() - t0, n, unfinished))
        stats = eng.elastic_stats
        return dict(ep=ep, num_requests=num_requests, max_tokens=max_tokens, killed_at_s=killed_at,
                    recovery_s=stats.last_recovery_seconds, requests_requeued=stats.requests_requeued,
                    rank_losses=stats.rank_losses, steps=steps)
    finally:
        eng.shutdown()


def phases(res: dict) -> dict:
    """tokens/s before the kill, during (the kill to the first step in which every unfinished request got a
    token again: recovery plus recompute), after."""
    steps, kill = res["steps"], res["killed_at_s"]
    before = [s for s in steps if s[0] < kill]
    rest = [s for s in steps if s[0] >= kill]
    end = next((i for i, s in enumerate(rest) if i > 0 and s[2] > 0 and s[2] == s[3]), len(rest) - 1)
    during, after = rest[:end + 1], rest[end + 1:]

    def rate(ss):
        t = sum(s[1] for s in ss)
        return sum(s[2] for s in ss) / t if t else 0.0

    span = lambda ss: (ss[-1][0] + ss[-1][1] - ss[0][0]) if ss else 0.0  # noqa: E731
    return dict(before_tok_s=rate(before), during_tok_s=rate(during), after_tok_s=rate(after),
                pause_s=span(during), time_to_recover_s=res["recovery_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. benchmarks/results/elastic_fault_cpu.json)")
    ap.add_argument("--plot", default=None, help="write a PNG of tokens/s over time here")
    ns = ap.parse_args(argv)
    res = run(ns.ep, ns.num_requests, ns.max_tokens)
    summary = phases(res)
    print(f"EP {ns.ep} -> {ns.ep - 1}, {ns.num_requests} requests x {ns.max_tokens} tokens: rank 1 killed at "
          f"{res['killed_at_s']:.2f} s; recovery {summary['time_to_recover_s']:.2f} s, "
          f"{res['requests_requeued']} requests requeued")
    print(f"tokens/s  before {summary['before_tok_s']:.0f}  during {summary['during_tok_s']:.0f} "
          f"(pause {summary['pause_s']:.2f} s)  after {summary['after_tok_s']:.0f}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(dict(date=str(date.today()), commit=_commit(), summary=summary, **res),
                                           indent=1) + "\n")
    if ns.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [s[0] + s[1] for s in res["steps"]]
        ys = [s[2] / s[1] if s[1] else 0 for s in res["steps"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(xs, ys, lw=1)
        ax.axvline(res["killed_at_s"], color="r", ls="--", label="rank 1 SIGKILLed")
        ax.set_xlabel("seconds")
        ax.set_ylabel("tokens/s (per step)")
        ax.set_title(f"elastic EP {ns.ep} -> {ns.ep - 1} on CPU: recovery {summary['time_to_recover_s']:.2f} s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(ns.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
