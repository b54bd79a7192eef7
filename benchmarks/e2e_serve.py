"""`engine_e2e`'s serving part: a `moelink serve` subprocess (gRPC only, free loopback port) driven by the
bench-serve load generator (`serve_load`), over the VllmEngine protocol: token-id prompts in, token ids out
(the server then detokenizes nothing, as behind the OpenAI HTTP gateway).

Measured: the server's start-up (process start to its "serving" line), the TTFT of the very first request
after start-up (alone, before anything warmed the server up), then one closed loop per concurrency level (C
clients, `rounds` x C requests): TTFT and ITL p50/p99 and output tokens/s, as serve_load reports them.
"""
from __future__ import annotations

import asyncio
import random
import time

from .serve_load import _Client, _closed_loop, summarize
from .server_process import start_server, stop_server


def _level_row(concurrency: int, res: list[dict], input_len: int) -> dict:
    s = summarize(res, input_len, dict(ttft_ms=None, tpot_ms=None, e2e_ms=None))
    return dict(concurrency=concurrency, requests=s["num_requests"], completed=s["completed"], errors=s["errors"],
                ttft_ms=dict(p50=s["ttft_ms"]["p50"], p99=s["ttft_ms"]["p99"]),
                itl_ms=dict(p50=s["itl_ms"]["p50"], p99=s["itl_ms"]["p99"]),
                out_tok_s=s["output_token_throughput"], duration_s=s["duration_s"])


async def _drive(target: str, levels: list[int], input_len: int, output_len: int, rounds: int, timeout_s: float,
                 deadline: float, seed: int) -> tuple[dict, list[dict]]:
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        client = _Client(channel, "vllm", None, timeout_s)
        # The vocabulary comes with the first request's prompt: asked first, it is not itself a generation.
        info = await pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30)
        rng = random.Random(seed)
        lo = min(1000, info.vocab_size // 4)

        def prompts(n):
            return [[rng.randrange(lo, info.vocab_size) for _ in range(input_len)] for _ in range(n)]

        first = await client.run("first", prompts(1)[0], output_len)
        first_row = dict(ok=first["ok"], error=first.get("error"),
                         ttft_ms=None if first.get("ttft") is None else first["ttft"] * 1e3,
                         e2e_ms=(first["end"] - first["start"]) * 1e3)
        rows = []
        for i, c in enumerate(levels):
            left = deadline - time.monotonic()
            if left <= 0:
                rows += [dict(concurrency=x, error="not run: the serve part's deadline passed") for x in levels[i:]]
                break
            try:
                res = await asyncio.wait_for(_closed_loop(client, prompts(rounds * c), output_len, c, f"c{c}"), left)
            except asyncio.TimeoutError:
                rows.append(dict(concurrency=c, error=f"timed out after {left:.0f} s (the serve part's deadline)"))
                rows += [dict(concurrency=x, error="not run: an earlier level timed out") for x in levels[i + 1:]]
                break
            rows.append(_level_row(c, res, input_len))
            print(f"  serve C={c:>4}: {rows[-1]['out_tok_s']:9.0f} out tok/s, TTFT p50/p99 "
                  f"{rows[-1]['ttft_ms']['p50']}/{rows[-1]['ttft_ms']['p99']} ms, ITL p50/p99 "
                  f"{rows[-1]['itl_ms']['p50']}/{rows[-1]['itl_ms']['p99']} ms", flush=True)
        return first_row, rows


def run_serve(model_dir: str, serve_args: str, levels: list[int], input_len: int, output_len: int, rounds: int,
              deadline: float, start_timeout_s: float = 300.0, request_timeout_s: float = 120.0,
              seed: int = 0) -> dict:
    """Start the server, measure, stop it (by PID). Returns dict(startup_s, first_request, levels)."""
    t0 = time.perf_counter()
    proc, target = start_server(model_dir, serve_args, timeout_s=min(start_timeout_s, max(1.0, deadline - time.monotonic())))
    startup_s = time.perf_counter() - t0
    print(f"  serve: `moelink serve` up on {target} after {startup_s:.1f} s", flush=True)
    try:
        first, rows = asyncio.run(_drive(target, levels, input_len, output_len, rounds, request_timeout_s, deadline,
                                         seed))
    finally:
        stop_server(proc)
    return dict(startup_s=startup_s, first_request=first, levels=rows)
