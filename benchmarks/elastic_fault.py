"""Fault injection under elastic EP on CPU: SIGKILL one rank mid-stream, print time-to-recover and tokens/s
before, during and after.

    python -m moelink.benchmarks.elastic_fault [--ep 4] [--num-requests 64] [--max-tokens 64] [--out benchmarks/results/elastic_fault_cpu.json]

An EP N engine (`--elastic-ep`, Ray, gloo, a tiny random Qwen3-MoE in float32) serves `--num-requests`
concurrent greedy requests; once a third of the tokens are out, the process of rank 1 is SIGKILLed. Each
step's time and tokens are recorded; "during" is the step that lost the rank plus the recovery and the
recompute of every requeued request (until the tokens/s of a window of steps is back to the after-phase's),
so read it as the pause clients see. The JSON holds the per-step series; `--plot` draws tokens/s over time.

`--rejoin`: a replacement rank rejoins (engine/cluster/rejoin.py, `--ep-rejoin-delay-s`): the stream stays steady (a
finished request is replaced by a new one) until the group is back to EP N and `--after-rejoin-s` more, then
drains; tokens/s are printed before the loss, during it, after it (EP N-1), during the admission and after it.
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

from moelink.engine.api.provenance import git_commit as _commit

MODEL_KW = dict(arch="qwen3_moe", num_layers=2, hidden_size=128, num_experts=16, top_k=4, num_heads=4,
                num_kv_heads=2, head_dim=32, moe_intermediate_size=128, vocab_size=512)


def run(ep: int, num_requests: int, max_tokens: int, rejoin: bool = False, rejoin_delay_s: float = 1.0,
        after_rejoin_s: float = 3.0, timeout_s: float = 300.0) -> dict:
    from moelink.engine import EngineArgs, SamplingParams
    from moelink.engine.core.llm_engine import LLMEngine
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(Path(tempfile.mkdtemp(prefix="elastic-bench-")) / "m", **MODEL_KW)
    eng = LLMEngine(EngineArgs(model=str(path), dtype="float32", expert_parallel_size=ep, elastic_ep=True,
                               ep_rejoin=rejoin, ep_rejoin_delay_s=rejoin_delay_s, max_num_seqs=num_requests,
                               num_kv_blocks=1024).create_engine_config())
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

        def add(i: int) -> None:
            eng.add_request(f"r{i}", [(7 * i + j) % 500 + 3 for j in range(8 + i % 8)], params)

        for i in range(num_requests):
            add(i)
        total, done, killed_at, rejoined_at, steps, next_id = num_requests * max_tokens, 0, None, None, [], num_requests
        stats = eng.elastic_stats
        t_start = time.monotonic()
        while eng.has_requests():
            if time.monotonic() - t_start > timeout_s:
                raise RuntimeError(f"elastic_fault: not done in {timeout_s:g} s ({stats})")
            if killed_at is None and done >= total // 3:
                killed_at = time.monotonic() - t_start
                os.kill(eng.executor.rank_pids[1], signal.SIGKILL)  # type: ignore[attr-defined]  # a Ray executor's
            unfinished = sum(s.num_running + s.num_waiting for s in eng.rank_stats())
            t0 = time.monotonic()
            outs = eng.step()
            n = len(outs)  # one new token per output (no speculative decoding)
            done += n
            steps.append((t0 - t_start, time.monotonic() - t0, n, unfinished, eng.executor.world_size))
            if rejoin and rejoined_at is None and stats.rejoins:
                rejoined_at = t0 - t_start  # the admission ran at the start of this step
            if rejoin and (rejoined_at is None or time.monotonic() - t_start < rejoined_at + after_rejoin_s):
                for o in outs:  # a steady stream: each finished request is replaced
                    if o.finished:
                        add(next_id)
                        next_id += 1
        return dict(ep=ep, num_requests=num_requests, max_tokens=max_tokens, killed_at_s=killed_at,
                    recovery_s=stats.last_recovery_seconds, requests_requeued=stats.requests_requeued,
                    rank_losses=stats.rank_losses, rejoined_at_s=rejoined_at, rejoin_s=stats.last_rejoin_seconds,
                    requests_served=next_id, steps=steps)
    finally:
        eng.shutdown()


def phases(res: dict) -> dict:
    """tokens/s before the kill, during (the kill to the first step in which every unfinished request got a
    token again: recovery plus recompute), after."""
    steps, kill = res["steps"], res["killed_at_s"]
    before = [s for s in steps if s[0] < kill]
    rest = [s for s in steps if s[0] >= kill]
    end = _pause_split(rest)
    during, after = rest[:end + 1], rest[end + 1:]

    def rate(ss):
        t = sum(s[1] for s in ss)
        return sum(s[2] for s in ss) / t if t else 0.0

    span = lambda ss: (ss[-1][0] + ss[-1][1] - ss[0][0]) if ss else 0.0  # noqa: E731
    return dict(before_tok_s=rate(before), during_tok_s=rate(during), after_tok_s=rate(after),
                pause_s=span(during), time_to_recover_s=res["recovery_s"])


def _pause_split(steps: list) -> int:
    """Index of the first step (after the first) in which every unfinished request got a token again."""
    return next((i for i, s in enumerate(steps) if i > 0 and s[2] > 0 and s[2] == s[3]), len(steps) - 1)


def rejoin_phases(res: dict) -> dict:
    """`phases` up to the rejoin (its "after" is EP N-1), then during the admission (the rejoin step to the first
    step in which every unfinished request got a token again) and after it (EP N)."""
    rej = res["rejoined_at_s"]
    base = phases(dict(res, steps=[s for s in res["steps"] if s[0] < rej]))
    rest = [s for s in res["steps"] if s[0] >= rej]
    end = _pause_split(rest)
    during, after = rest[:end + 1], rest[end + 1:]

    def rate(ss):
        t = sum(s[1] for s in ss)
        return sum(s[2] for s in ss) / t if t else 0.0

    return dict(base, after_loss_tok_s=base.pop("after_tok_s"), during_rejoin_tok_s=rate(during),
                rejoin_pause_s=(during[-1][0] + during[-1][1] - during[0][0]) if during else 0.0,
                after_rejoin_tok_s=rate(after), time_to_rejoin_s=res["rejoin_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. benchmarks/results/elastic_fault_cpu.json)")
    ap.add_argument("--plot", default=None, help="write a PNG of tokens/s over time here")
    ap.add_argument("--rejoin", action="store_true", help="a replacement rank rejoins: back to EP N (see above)")
    ap.add_argument("--ep-rejoin-delay-s", type=float, default=1.0)
    ap.add_argument("--after-rejoin-s", type=float, default=3.0, help="the steady stream goes on this long at EP N")
    ns = ap.parse_args(argv)
    res = run(ns.ep, ns.num_requests, ns.max_tokens, ns.rejoin, ns.ep_rejoin_delay_s, ns.after_rejoin_s)
    if ns.rejoin and res["rejoined_at_s"] is None:
        raise SystemExit("elastic_fault: the replacement did not rejoin before the stream ended")
    summary = rejoin_phases(res) if ns.rejoin else phases(res)
    print(f"EP {ns.ep} -> {ns.ep - 1}, {ns.num_requests} requests x {ns.max_tokens} tokens: rank 1 killed at "
          f"{res['killed_at_s']:.2f} s; recovery {summary['time_to_recover_s']:.2f} s, "
          f"{res['requests_requeued']} requests requeued" + (" (at the recovery and the rejoin)" if ns.rejoin else ""))
    if ns.rejoin:
        print(f"replacement admitted at {res['rejoined_at_s']:.2f} s in {summary['time_to_rejoin_s']:.2f} s; "
              f"{res['requests_served']} requests served in all")
        print(f"tokens/s  before {summary['before_tok_s']:.0f}  during loss {summary['during_tok_s']:.0f} "
              f"(pause {summary['pause_s']:.2f} s)  after loss (EP {ns.ep - 1}) {summary['after_loss_tok_s']:.0f}  "
              f"during rejoin {summary['during_rejoin_tok_s']:.0f} (pause {summary['rejoin_pause_s']:.2f} s)  "
              f"after rejoin (EP {ns.ep}) {summary['after_rejoin_tok_s']:.0f}")
    else:
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
        if res.get("rejoined_at_s") is not None:
            ax.axvline(res["rejoined_at_s"], color="g", ls="--", label="replacement rejoined")
        ax.set_xlabel("seconds")
        ax.set_ylabel("tokens/s (per step)")
        title = f"elastic EP {ns.ep} -> {ns.ep - 1} on CPU: recovery {summary['time_to_recover_s']:.2f} s"
        if ns.rejoin:
            title = (f"elastic EP {ns.ep} -> {ns.ep - 1} -> {ns.ep} on CPU: recovery "
                     f"{summary['time_to_recover_s']:.2f} s, rejoin {summary['time_to_rejoin_s']:.2f} s")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ns.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
