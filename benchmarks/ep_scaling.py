"""Expert-parallel scaling on CPU: throughput for EP 1/2/4, the dispatch volume it saves, and the two
dispatch modes side by side.

    python -m moelink.benchmarks.ep_scaling [--ep 1 2 4] [--num-requests 32] [--all-to-all torch torch_padded] [--overlap-ep 2]

Each EP > 1 runs once per all-to-all backend: "torch" (exact splits, one counts
exchange and host sync per dispatch) and "torch_padded" (the two-mode path:
low-latency decode steps at --ep-decode-capacity, high-throughput prefill/mixed
steps at the step's largest tokens-per-rank; comm/ep_modes.py). The second
table gives, per mode, bytes per step (payload: one row per token and
destination rank; wire: padding included) and rows per token and MoE layer,
from the engine's own counters; `planned wire` is
comm.ep_modes.dispatch_wire_bytes, the formula the cluster model reads, fed the
measured rows.

With --overlap-ep N (default 2), the same workload also runs at EP N with
--enable-two-batch-overlap off and on, alternately, and the step times are
printed side by side with their ratio.

Every EP size runs the same seeded workload (greedy, EOS ignored) on Ray with
gloo. The table compares the bytes our dispatch sent (each token once per
distinct destination rank) with what a naive dispatch sends (once per
(token, expert) pair). On a 2-core CPU machine more ranks do not run faster —
the ranks share the cores and gloo copies through loopback — so read the
throughput column as overhead, and the bytes columns as the design's saving
(each rank, EP 1 included, runs one intra-op thread);
GPU/NVLink speed is the cluster model's job (`moelink plan`, engine/api/plan_cli.py).
`--overlap-ep N` (default 2) then runs EP N with two-batch overlap off and on (two engines, alternating rounds)
and prints the median step time of each and their ratio: on CPU ranks sharing two cores the overlap has little idle time to fill, so read it as
the cost or gain of the schedule itself, not as a GPU prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from datetime import date
from pathlib import Path

from tqdm import tqdm
from moelink.engine.api.provenance import git_commit as _commit

MODEL_KW = dict(arch="qwen3_moe", num_layers=2, hidden_size=128, num_experts=16, top_k=4, num_heads=4,
                num_kv_heads=2, head_dim=32, moe_intermediate_size=128, vocab_size=512)



def run(ep: int, path: str, prompts, outs, all_to_all: str = "auto", decode_capacity: int | None = None) -> dict:
    from moelink.engine import LLM, SamplingParams

    llm = LLM(path, dtype="float32", expert_parallel_size=ep, max_num_seqs=64, num_kv_blocks=1024,
              all_to_all=all_to_all, ep_decode_capacity=decode_capacity)
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
        llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up (and process start) excluded
        m = llm.engine.moe_metrics
        base_bytes, base_pairs = m.bytes_dispatched, m.total_routed()
        m.per_mode.clear()  # the warm-up's steps are not the workload's
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        produced = sum(len(r.outputs[0].token_ids) for r in res)
        pairs = m.total_routed() - base_pairs
        elem = 4  # float32 activations
        naive = pairs * MODEL_KW["hidden_size"] * elem
        sent = m.bytes_dispatched - base_bytes if ep > 1 else 0
        modes = {}
        for mode, c in m.per_mode.items():
            steps = max(c["steps"], 1)
            tokens_layers = c["pairs"] / MODEL_KW["top_k"]  # tokens x MoE layers dispatched in that mode
            modes[mode] = dict(steps=c["steps"], payload_bytes_per_step=c["bytes"] / steps,
                               wire_bytes_per_step=c["wire_bytes"] / steps,
                               rows_per_token=c["rows"] / tokens_layers if tokens_layers else 0.0,
                               wire_rows_per_token=c["wire_rows"] / tokens_layers if tokens_layers else 0.0,
                               planned_wire_bytes_per_step=_planned_wire(mode, ep, c, steps, decode_capacity or 64))
        return dict(ep=ep, all_to_all=all_to_all, modes=modes, seconds=dt, output_tokens=produced, tok_s=produced / dt, routed_pairs=pairs,
                    dispatched_bytes=sent, naive_bytes=naive if ep > 1 else 0,
                    saving=(1 - sent / naive) if ep > 1 and naive else 0.0,
                    dispatch_s=m.dispatch_s, combine_s=m.combine_s, compute_s=m.compute_s)
    finally:
        llm.engine.shutdown()


def _planned_wire(mode: str, ep: int, c: dict, steps: int, decode_capacity: int) -> float:
    """comm.ep_modes.dispatch_wire_bytes (the cluster model's formula) for this mode's measured tokens and
    distinct ranks per token: per dispatch and rank, times dispatches per step (ranks x MoE layers). Block size:
    low-latency, the configured decode capacity; high-throughput, the step's largest tokens-per-rank, which
    only the driver knew (its mean is read back from the wire rows); exact: none."""
    from moelink.comm.ep_modes import dispatch_wire_bytes

    row_bytes = MODEL_KW["hidden_size"] * 4
    dispatches = steps * ep * MODEL_KW["num_layers"]
    tokens = c["pairs"] / MODEL_KW["top_k"] / dispatches
    if not tokens:
        return 0.0
    capacity = decode_capacity if mode == "low_latency" else max(c["wire_rows"] / dispatches / ep, tokens)
    b = dispatch_wire_bytes(mode, world_size=ep, tokens=tokens, distinct_ranks_per_token=c["rows"] / dispatches / tokens,
                            row_bytes=row_bytes, capacity=None if mode == "exact" else capacity)
    return b.wire * dispatches / steps
# --- two-batch overlap on and off (issue 17 item 4) -----------------------------------------------------------

def run_overlap(ep: int, path: str, prompts, outs, rounds: int = 3) -> list[dict]:
    """The same workload at one EP size with --enable-two-batch-overlap off and on: two engines side by side,
    run alternately `rounds` times each (so a machine whose load drifts hits both alike); per engine the median
    over rounds of the mean step time (the driver's wall time per `LLMEngine.step`, warm-up excluded) and of
    output tokens per second."""
    import statistics

    from moelink.engine import LLM, SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
    engines, samples = {}, {False: [], True: []}
    try:
        for overlap in (False, True):
            llm = engines[overlap] = LLM(path, dtype="float32", expert_parallel_size=ep, max_num_seqs=64,
                                         num_kv_blocks=1024, enable_two_batch_overlap=overlap)
            llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up (and process start) excluded
        for _ in range(rounds):
            for overlap, llm in engines.items():
                engine, step, times = llm.engine, llm.engine.step, []

                def timed_step(_step=step, _times=times):
                    t = time.perf_counter()
                    try:
                        return _step()
                    finally:
                        _times.append(time.perf_counter() - t)

                engine.step = timed_step
                t0 = time.perf_counter()
                res = llm.generate(prompts, params, use_tqdm=False)
                dt = time.perf_counter() - t0
                engine.step = step
                produced = sum(len(r.outputs[0].token_ids) for r in res)
                samples[overlap].append((1e3 * sum(times) / len(times), produced / dt, len(times)))
    finally:
        for llm in engines.values():
            llm.engine.shutdown()
    return [dict(ep=ep, two_batch_overlap=overlap, rounds=rounds, steps=got[0][2],
                 step_ms=statistics.median(x[0] for x in got), tok_s=statistics.median(x[1] for x in got),
                 step_ms_rounds=[round(x[0], 2) for x in got])
            for overlap, got in samples.items()]


def print_overlap(rows: list[dict]) -> None:
    off, on = (next(r for r in rows if r["two_batch_overlap"] is v) for v in (False, True))
    print(f"\nTwo-batch overlap at EP {off['ep']} (same workload, greedy; {off['steps']} steps; median of "
          f"{off['rounds']} alternating rounds; step ms per round off {off['step_ms_rounds']}, on {on['step_ms_rounds']})\n")
    print("| two-batch overlap | mean step ms | output tok/s |")
    print("|---|---|---|")
    for r in (off, on):
        print(f"| {'on' if r['two_batch_overlap'] else 'off'} | {r['step_ms']:.1f} | {r['tok_s']:.0f} |")
    print(f"\nstep time on / off = {on['step_ms'] / off['step_ms']:.3f} (below 1: overlap is faster)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-to-all", nargs="+", default=["torch", "torch_padded"],
                    help="backends to run at each EP > 1 (the two-mode path is torch_padded)")
    ap.add_argument("--ep-decode-capacity", type=int, default=None, help="low-latency capacity (default max_num_seqs)")
    ap.add_argument("--overlap-ep", type=int, default=2,
                    help="also time this EP size with two-batch overlap off and on (0: skip)")
    ap.add_argument("--overlap-rounds", type=int, default=3, help="alternating rounds per setting (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ep_scaling_cpu.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("MOELINK_MASTER_ADDR", "127.0.0.1")
    import ray

    import torch

    from moelink.engine.tools.tiny_model import make_tiny_model

    # One intra-op thread per rank, as every Ray rank on CPU uses: EP 1 gets one core like
    # each EP rank does, and no rank's OpenMP threads spin against another rank's.
    torch.set_num_threads(1)

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, MODEL_KW["vocab_size"]) for _ in range(rng.randint(32, 128))] for _ in range(args.num_requests)]
    outs = [rng.randint(16, 32) for _ in range(args.num_requests)]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(make_tiny_model(tmp, **MODEL_KW))
            for ep in tqdm(sorted(args.ep), desc="EP sizes", unit="run"):
                # EP 1 runs in-process; Ray starts only for the first EP > 1, so its
                # booting worker processes never compete with the one-rank run.
                if ep > 1 and not ray.is_initialized():
                    ray.init(address="local", num_cpus=max(*args.ep, 2 * args.overlap_ep), include_dashboard=False,
                             log_to_driver=False,
                             _node_ip_address="127.0.0.1")
                for a2a in (["auto"] if ep == 1 else args.all_to_all):
                    rows.append(run(ep, path, prompts, outs, a2a, args.ep_decode_capacity if ep > 1 else None))
            overlap_rows = []
            if args.overlap_ep > 1:
                if not ray.is_initialized():
                    ray.init(address="local", num_cpus=2 * args.overlap_ep, include_dashboard=False,
                             log_to_driver=False, _node_ip_address="127.0.0.1")
                overlap_rows = run_overlap(args.overlap_ep, path, prompts, outs, args.overlap_rounds)
    finally:
        ray.shutdown()
    print(f"\n{args.num_requests} requests, prompts 32-128, outputs 16-32; model {MODEL_KW['num_layers']}L "
          f"h{MODEL_KW['hidden_size']} E{MODEL_KW['num_experts']} top{MODEL_KW['top_k']} fp32; CPU, {os.cpu_count()} cores\n")
    print("| EP | all-to-all | output tok/s | routed (token, expert) pairs | dispatched MB (ours) | naive MB (per pair) | saved |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ep']} | {r['all_to_all']} | {r['tok_s']:.0f} | {r['routed_pairs']} | {r['dispatched_bytes'] / 1e6:.2f} | "
              f"{r['naive_bytes'] / 1e6:.2f} | {100 * r['saving']:.0f}% |")
    print("\nPer dispatch mode (all ranks, all MoE layers; KB per step):\n")
    print("| EP | all-to-all | mode | steps | payload KB/step | wire KB/step | planned wire KB/step | rows/token | wire rows/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode, c in sorted(r["modes"].items()):
            print(f"| {r['ep']} | {r['all_to_all']} | {mode} | {c['steps']} | {c['payload_bytes_per_step'] / 1e3:.1f} | "
                  f"{c['wire_bytes_per_step'] / 1e3:.1f} | {c['planned_wire_bytes_per_step'] / 1e3:.1f} | "
                  f"{c['rows_per_token']:.2f} | {c['wire_rows_per_token']:.2f} |")
    if overlap_rows:
        print_overlap(overlap_rows)
    result = dict(benchmark="ep_scaling", date=str(date.today()), commit=_commit(), device="cpu",
                  cores=os.cpu_count(), model=MODEL_KW, num_requests=args.num_requests, rows=rows,
                  two_batch_overlap=overlap_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
