r"""Does another client's load slow a user down? One user's TTFT and inter-token gap, idle and under attack.

    python -m moelink.benchmarks.noisy_neighbors                       # the built-in model, both attacks
    python -m moelink.benchmarks.noisy_neighbors --duration-s 30 --rounds 3 \
        --out benchmarks/results/noisy_neighbors_cpu.json

Two attacks from issue 41, each against `moelink serve` servers this starts on loopback (the attacker is another
process with its own connection, so another client):
- spec: --streams closed-loop streams whose n-gram drafts are almost always rejected (text prompts of common words,
  so the drafter finds matches, sampled at temperature 0.8, so the drafts miss), against a server with
  `--speculative-config ngram` (k = --k) as it was (every draft verified: min_draft_acceptance 0,
  max_verify_fraction 1), with the adaptive draft length (the defaults), and a plain server (the finding's
  comparison: the same load without speculation);
- fanout: one client keeping --fanout-requests requests of n=64 x --fanout-tokens tokens in flight (re-sent as
  each ends), against a server first come, first served (--no-client-fairness) and one with per-client fairness.
The user: --user-streams closed-loop streams of --input-len random token ids, --output-len new tokens (greedy, EOS
ignored), measured for --duration-s in --rounds alternating segments alone (idle) and under the attack. Reported
per server: TTFT and ITL (a message with k tokens counts as k gaps of 1/k of its wait) p50/p90/p99/max, and their
ratio attack / idle; for speculation, the drafts verified and accepted during the attack. Client, attacker and
server share the machine (2 cores on the reference VM): the attacker's own CPU is part of what the user feels.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path

from moelink.engine.api.provenance import git_commit, write_result
from moelink.benchmarks.serve_load import RUNS_DIR, _Client, _pct
from moelink.benchmarks.server_process import free_port, start_server, stop_server
from moelink.benchmarks.spec_metrics import level_delta, scrape

BUILTIN = Path(__file__).resolve().parent.parent / "builtin-model"
SPEC = '{"method": "ngram", "num_speculative_tokens": %d%s}'
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: its own client


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BUILTIN), help="checkpoint to serve (default: the built-in model)")
    p.add_argument("--attack", choices=("spec", "fanout", "both"), default="both")
    p.add_argument("--serve-args", default="", help="extra flags for every server")
    p.add_argument("--k", type=int, default=3, help="num_speculative_tokens of the speculative servers")
    p.add_argument("--streams", type=int, default=32, help="the spec attack's streams")
    p.add_argument("--fanout-requests", type=int, default=4)
    p.add_argument("--fanout-tokens", type=int, default=500)
    p.add_argument("--user-streams", type=int, default=1)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=20.0, help="time per condition, all rounds together")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/runs/noisy_neighbors_<time>.json)")


# -- the attacker (its own process) --------------------------------------------------------------
def _words() -> list[str]:
    return (BUILTIN / "words.txt").read_text().split()


async def _spec_attack(target: str, streams: int, seed: int, started, stop) -> None:
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    words, rng = _words(), random.Random(seed)
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def stream(i: int) -> None:
            while not stop.is_set():
                text = " ".join(rng.choice(words) for _ in range(150))  # common words: the drafter finds matches
                req = pb.GenerateRequest(prompt=text, sampling_params=pb.SamplingParams(
                    temperature=0.8, max_tokens=128, ignore_eos=True))  # sampled: the drafts miss
                try:
                    async for _ in stub.Generate(req, timeout=300):
                        started.set()
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)

        await _until_stopped([stream(i) for i in range(streams)], stop)


async def _fanout_attack(target: str, requests: int, tokens: int, seed: int, started, stop) -> None:
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def loop(i: int) -> None:
            while not stop.is_set():
                req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[rng.randrange(3, 4000) for _ in range(8)]),
                                         sampling_params=pb.SamplingParams(n=64, max_tokens=tokens, ignore_eos=True,
                                                                           temperature=0.0))
                try:
                    async for _ in stub.Generate(req, timeout=600):
                        started.set()
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)

        await _until_stopped([loop(i) for i in range(requests)], stop)


async def _until_stopped(coros, stop) -> None:
    tasks = [asyncio.create_task(c) for c in coros]
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()  # cancels the calls: the server aborts their requests
    await asyncio.gather(*tasks, return_exceptions=True)


def _attacker(kind: str, target: str, ns_dict: dict, started, stop) -> None:
    ns = argparse.Namespace(**ns_dict)
    if kind == "spec":
        asyncio.run(_spec_attack(target, ns.streams, ns.seed, started, stop))
    else:
        asyncio.run(_fanout_attack(target, ns.fanout_requests, ns.fanout_tokens, ns.seed, started, stop))


# -- the user ------------------------------------------------------------------------------------
async def _user(target: str, ns, tag: str, duration_s: float) -> list[dict]:
    import grpc

    rng = random.Random(f"{ns.seed}-{tag}")  # fresh prompts: no prefix-cache hits from the last segment
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        client = _Client(channel, "native", None, 300.0)
        end = time.perf_counter() + duration_s
        results: list[dict] = []

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < end:
                prompt = [rng.randrange(3, 4000) for _ in range(ns.input_len)]
                results.append(await client.run(f"user-{tag}-{w}-{i}", prompt, ns.output_len))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(ns.user_streams)))
        return results


async def _idle(target: str, timeout_s: float = 120.0) -> None:
    """Until the server runs and queues nothing (the last attack's requests aborted)."""
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await stub.ServerInfo(pb.ServerInfoRequest(), timeout=10)
            if info.num_running == 0 and info.num_waiting == 0 and info.active_requests == 0:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the server did not go idle within {timeout_s:g} s")


def _summary(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    itls = [x for r in ok for x in r["itls"]]
    ttfts = [r["ttft"] for r in ok]
    ms = (lambda v: None if v is None else round(v * 1e3, 2))
    return dict(requests=len(results), completed=len(ok),
                errors=sorted({r["error"] for r in results if not r["ok"]}),
                ttft_ms={f"p{q}": ms(_pct(ttfts, q)) for q in (50, 90)} | {"max": ms(max(ttfts, default=None))},
                itl_ms={f"p{q}": ms(_pct(itls, q)) for q in (50, 90, 99)} | {"max": ms(max(itls, default=None))})


def _ratio(a: dict, b: dict, key: str, q: str) -> float | None:
    x, y = a[key][q], b[key][q]
    return None if x is None or not y else round(x / y, 2)


def measure(kind: str, label: str, serve_args: str, ns) -> dict:
    metrics_port = free_port() if kind == "spec" else None
    extra = f"{ns.serve_args} {serve_args}" + (f" --metrics-port {metrics_port}" if metrics_port else "")
    proc, target = start_server(ns.model, extra, timeout_s=300)
    ctx = mp.get_context("spawn")
    runs: dict[str, list] = {"idle": [], "attack": []}
    drafts = []
    try:
        asyncio.run(_user(target, ns, "warmup", 3.0))
        for r in range(ns.rounds):
            asyncio.run(_idle(target))
            res = asyncio.run(_user(target, ns, f"idle{r}", ns.duration_s / ns.rounds))
            runs["idle"] += res
            print(f"{kind}/{label} round {r} idle: {_summary(res)}", flush=True)
            started, stop = ctx.Event(), ctx.Event()
            attacker = ctx.Process(target=_attacker, args=(kind, target, vars(ns), started, stop), daemon=True)
            attacker.start()
            try:
                if not started.wait(300):
                    raise RuntimeError("the attack got no token in 300 s")
                time.sleep(1.0)  # its load builds up
                before = scrape(f"http://127.0.0.1:{metrics_port}/metrics") if metrics_port else None
                res = asyncio.run(_user(target, ns, f"attack{r}", ns.duration_s / ns.rounds))
                if metrics_port:
                    drafts.append(level_delta(before, scrape(f"http://127.0.0.1:{metrics_port}/metrics")))
            finally:
                stop.set()
                attacker.join(60)
                if attacker.is_alive():
                    attacker.kill()
            runs["attack"] += res
            print(f"{kind}/{label} round {r} attack: {_summary(res)}", flush=True)
        asyncio.run(_idle(target))  # nothing left behind: every attack request aborted and freed
    finally:
        stop_server(proc)
    idle, attack = _summary(runs["idle"]), _summary(runs["attack"])
    row = dict(serve_args=serve_args.strip(), idle=idle, attack=attack,
               attack_over_idle={f"{key}_{q}": _ratio(attack, idle, key, q)
                                 for key, q in (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("itl_ms", "p50"),
                                                ("itl_ms", "p90"), ("itl_ms", "p99"))})
    if drafts:
        d = [x for x in drafts if x]
        rows, tokens, acc = (sum(x[k] for x in d) for k in ("verify_rows", "draft_tokens", "accepted_tokens"))
        row["drafts_during_attack"] = dict(verify_rows=rows, draft_tokens=tokens, accepted_tokens=acc,
                                           acceptance_rate=round(acc / tokens, 3) if tokens else None)
    return row


def servers(kind: str, k: int) -> list[tuple[str, str]]:
    if kind == "spec":
        return [("plain", ""),
                ("spec_every_draft", "--speculative-config '%s'" % (
                    SPEC % (k, ', "min_draft_acceptance": 0, "max_verify_fraction": 1'))),
                ("spec_adaptive", "--speculative-config '%s'" % (SPEC % (k, "")))]
    return [("fcfs", "--no-client-fairness"), ("fair", "")]


def run(ns) -> dict:
    load_before = os.getloadavg()
    kinds = ("spec", "fanout") if ns.attack == "both" else (ns.attack,)
    out = {kind: {label: measure(kind, label, args, ns) for label, args in servers(kind, ns.k)} for kind in kinds}
    for kind, rows in out.items():
        ref = rows.get("plain")
        if ref is not None:  # the finding's comparison: the same attack against a server without speculation
            for row in rows.values():
                row["attack_over_plain_attack"] = {f"itl_ms_{q}": _ratio(row["attack"], ref["attack"], "itl_ms", q)
                                                   for q in ("p50", "p90")}
    return dict(benchmark="noisy_neighbors", device="cpu", host=platform.node(), cpus=os.cpu_count(),
                load_average_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                workload={k: v for k, v in vars(ns).items() if k != "out"}, results=out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    ns = p.parse_args(argv)
    result = run(ns)
    path = Path(ns.out) if ns.out else RUNS_DIR / f"noisy_neighbors_{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    write_result(path, result)
    for kind, rows in result["results"].items():
        for label, row in rows.items():
            print(f"{kind:6s} {label:17s} idle ttft p50 {row['idle']['ttft_ms']['p50']} itl p50/p90 "
                  f"{row['idle']['itl_ms']['p50']}/{row['idle']['itl_ms']['p90']} | attack ttft p50 "
                  f"{row['attack']['ttft_ms']['p50']} itl p50/p90 {row['attack']['itl_ms']['p50']}/"
                  f"{row['attack']['itl_ms']['p90']} | ratio {row['attack_over_idle']} "
                  f"{row.get('drafts_during_attack', '')}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
