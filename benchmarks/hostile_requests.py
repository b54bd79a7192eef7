"""Do hostile requests stall everyone else? Inter-token latency of normal streams with and without them.

    python -m moelink.benchmarks.hostile_requests                   # builds the tiny model, starts a server
    python -m moelink.benchmarks.hostile_requests --target HOST:PORT  # against a running server

Two conditions of --duration-s each against one server, in --rounds
alternating segments (so that other load on the machine falls on both
alike): 32 closed-loop streams of normal requests (native API, --input-len
random token ids, --output-len new tokens, greedy, EOS ignored) alone, and
the same with hostile requests in flight: one 16 MB text prompt and one request with 5 M
stop_token_ids and n=64 (a ~5 MB message), each sent again every
--hostile-interval-s (or as soon as it is answered, if that takes longer; 0
floods), from a separate process so that building and sending them costs
the measuring client nothing. Printed side by side: ITL
(the gap between streamed tokens; a message with k tokens counts as k gaps
of 1/k of its wait) p50/p90/p99/max, output tokens/s, and the p99 ratio, plus
how many hostile requests were sent and how they were answered. Writes
benchmarks/results/hostile_requests_<device>.json. Client, attacker and
server share the machine on CPU runs: the attacker's own CPU use (building
16 MB messages, gRPC receiving them) is part of what the streams feel.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from moelink.engine.api.provenance import git_commit, write_result
from moelink.benchmarks.serve_load import RESULTS_DIR, _Client, _pct
from moelink.benchmarks.server_process import start_server, stop_server

HOSTILE_TEXT_BYTES = 16 << 20
HOSTILE_STOP_IDS = 5_000_000
HOSTILE_N = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--target", default=None, help="HOST:PORT of a running moelink server")
    src.add_argument("--model", default=None, help="checkpoint to serve (default: build the tiny model)")
    p.add_argument("--serve-args", default="", help="extra flags for the server the benchmark starts")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--duration-s", type=float, default=30.0, help="time under each condition, all rounds together")
    p.add_argument("--rounds", type=int, default=3, help="alternating (alone, hostile) segments")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hostile-interval-s", type=float, default=1.0,
                   help="each hostile request is re-sent this long after the last one was sent (0: at once, a flood)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="recorded in the JSON (e.g. which build --target runs)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hostile_requests_cpu.json)")


# -- the hostile client (its own process) ---------------------------------------------------
def _hostile_payloads() -> dict[str, bytes]:
    """Serialized once: re-sending costs the attacker no protobuf work."""
    from moelink.engine.server.gen import moelink_v1_pb2 as pb

    text = ("All work and no play makes Jack a dull boy. " * (HOSTILE_TEXT_BYTES // 44 + 1))[:HOSTILE_TEXT_BYTES]
    return {
        "16MB_prompt": pb.GenerateRequest(request_id="hostile-text", prompt=text).SerializeToString(),
        "5M_stop_ids_n64": pb.GenerateRequest(request_id="hostile-ids", prompt="hi", sampling_params=pb.SamplingParams(
            n=HOSTILE_N, max_tokens=16, stop_token_ids=[1] * HOSTILE_STOP_IDS)).SerializeToString(),
    }


def _attack(target: str, interval_s: float, ready, active, busy, stop, results) -> None:
    import threading

    import grpc

    payloads = _hostile_payloads()
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                     ("grpc.max_receive_message_length", 64 << 20)])
    generate = channel.unary_stream("/moelink.v1.Generation/Generate")  # bytes in, bytes out
    log: dict[str, list] = {name: [] for name in payloads}

    def loop(name: str, data: bytes) -> None:
        while not stop.is_set():
            if not active.wait(0.05):
                continue
            t0 = time.perf_counter()
            next_at = t0 + interval_s
            with busy.get_lock():
                busy.value += 1
            try:
                for _ in generate(data, timeout=120):
                    pass
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            finally:
                with busy.get_lock():
                    busy.value -= 1
            log[name].append((round(time.perf_counter() - t0, 4), code))
            stop.wait(max(0.0, next_at - time.perf_counter()))

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in payloads.items()]
    ready.set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    results.put(log)


# -- the normal streams ---------------------------------------------------------------------
async def _segment(target: str, ns, vocab: int, tag: str, duration_s: float) -> tuple[list[dict], float]:
    import grpc

    rng = random.Random(f"{ns.seed}-{tag}")  # fresh prompts per segment: no prefix-cache hits from the last one
    async with grpc.aio.insecure_channel(target) as channel:
        client = _Client(channel, "native", None, 120.0)
        end = time.perf_counter() + duration_s
        results = []

        async def worker(w: int):
            i = 0
            while time.perf_counter() < end:
                prompt = [rng.randrange(3, vocab) for _ in range(ns.input_len)]
                results.append(await client.run(f"{tag}-{w}-{i}", prompt, ns.output_len))
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(ns.streams)))
        return results, time.perf_counter() - t0


def _summary(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if r["ok"]]
    itls = [x for r in ok for x in r["itls"]]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    ms = (lambda v: None if v is None else round(v * 1e3, 2))
    return dict(
        requests=len(results), completed=len(ok), errors=errors, duration_s=round(elapsed, 2),
        output_tok_s=round(sum(r["tokens"] for r in ok) / elapsed, 1), itl_samples=len(itls),
        itl_ms={f"p{q}": ms(_pct(itls, q)) for q in (50, 90, 99)} | {"max": ms(max(itls, default=None))})


async def _vocab(target: str) -> int:
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        return (await pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30)).vocab_size


def run(ns) -> dict:
    proc = None
    tmp = None
    target = ns.target
    if target is None:
        model = ns.model
        if model is None:
            from moelink.engine.tools.tiny_model import make_tiny_model

            tmp = tempfile.TemporaryDirectory(prefix="moelink-hostile-")
            model = str(make_tiny_model(Path(tmp.name) / "tiny-model", arch="qwen3_moe"))
        proc, target = start_server(model, ns.serve_args)
    load_before = os.getloadavg()
    try:
        vocab = asyncio.run(_vocab(target))
        ctx = mp.get_context("spawn")
        ready, active, stop, busy, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
        attacker = ctx.Process(target=_attack, args=(target, ns.hostile_interval_s, ready, active, busy, stop, results),
                               daemon=True)
        attacker.start()
        ready.wait(120)
        asyncio.run(_segment(target, ns, vocab, "warmup", 3.0))
        runs: dict[str, list] = {"alone": [], "hostile": []}
        seconds = {"alone": 0.0, "hostile": 0.0}
        for r in range(ns.rounds):
            for condition in ("alone", "hostile"):
                if condition == "alone":
                    active.clear()
                    while busy.value:  # no hostile request left over from the last segment
                        time.sleep(0.05)
                else:
                    active.set()
                    time.sleep(0.2)  # the first hostile requests are on their way
                res, elapsed = asyncio.run(_segment(target, ns, vocab, f"{condition}{r}", ns.duration_s / ns.rounds))
                runs[condition] += res
                seconds[condition] += elapsed
                print(f"round {r} {condition}: {_summary(res, elapsed)['itl_ms']}", flush=True)
        active.clear()
        stop.set()
        log = results.get(timeout=180)
        attacker.join(30)
    finally:
        if proc is not None:
            stop_server(proc)
        if tmp is not None:
            tmp.cleanup()
    alone, hostile = _summary(runs["alone"], seconds["alone"]), _summary(runs["hostile"], seconds["hostile"])
    attacks = {name: dict(sent=len(entries), answers=sorted({c for _, c in entries}),
                          latency_s_p50=round(_pct([t for t, _ in entries], 50), 3) if entries else None,
                          latency_s_max=max((t for t, _ in entries), default=None))
               for name, entries in log.items()}
    return dict(
        benchmark="hostile_requests", device="cpu", host=platform.node(), cpus=mp.cpu_count(),
        # Other work on the machine shows up in both conditions alike (alternating rounds), but inflates both.
        load_average_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
        workload=dict(streams=ns.streams, duration_s=ns.duration_s, rounds=ns.rounds, input_len=ns.input_len,
                      output_len=ns.output_len,
                      hostile=dict(text_bytes=HOSTILE_TEXT_BYTES, stop_token_ids=HOSTILE_STOP_IDS, n=HOSTILE_N,
                                   interval_s=ns.hostile_interval_s)),
        target=ns.target or "started by the benchmark", serve_args=ns.serve_args, note=ns.note,
        alone=alone, with_hostile=hostile, hostile_requests=attacks,
        p99_itl_ratio=None if None in (hostile["itl_ms"]["p99"], alone["itl_ms"]["p99"]) else
        round(hostile["itl_ms"]["p99"] / alone["itl_ms"]["p99"], 2))


def table(result: dict) -> str:
    a, h = result["alone"], result["with_hostile"]
    rows = ["| | alone | with hostile requests in flight |", "|---|---|---|"]
    for q in ("p50", "p90", "p99", "max"):
        rows.append(f"| ITL {q} (ms) | {a['itl_ms'][q]} | {h['itl_ms'][q]} |")
    rows.append(f"| output tok/s | {a['output_tok_s']} | {h['output_tok_s']} |")
    failed = (lambda c: sum(c["errors"].values()))
    rows.append(f"| requests completed / failed | {a['completed']} / {failed(a)} | {h['completed']} / {failed(h)} |")
    ratio = result["p99_itl_ratio"]
    rows.append(f"| **p99 ITL ratio** | 1.00 | **{'n/a' if ratio is None else f'{ratio:.2f}x'}** |")
    lines = [f"- {name}: {v['sent']} sent, answered {', '.join(v['answers'])} (median {v['latency_s_p50']} s, "
             f"max {v['latency_s_max']} s)" for name, v in result["hostile_requests"].items()]
    return "\n".join(rows + [""] + lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    ns = p.parse_args(argv)
    result = run(ns)
    out = write_result(ns.out or RESULTS_DIR / "hostile_requests_cpu.json", result)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
