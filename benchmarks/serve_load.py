"""Serving load benchmark: closed-loop concurrency and Poisson arrivals against a gRPC server.

    # against a running server
    python -m moelink.benchmarks.serve_load --target 127.0.0.1:50051
    # or let it start `moelink serve MODEL --port 0` itself, and stop it afterwards
    python -m moelink.benchmarks.serve_load --model tiny-model
    moelink bench-serve --model tiny-model          # the same, from the CLI
    # through the OpenAI HTTP API instead (streamed /v1/completions; openai-chat: /v1/chat/completions)
    moelink bench-serve --backend openai --base-url http://127.0.0.1:8000
    moelink bench-serve --backend openai-chat --model tiny-model

Workload: random prompts of --input-len token ids, exactly --output-len new
tokens each (EOS ignored), greedy, streamed. With --prefix-reuse R, a fraction R
of the prompts begin with one of --num-prefixes shared prefixes of --prefix-len
tokens (drawn uniformly, the same for the whole run; the rest of the prompt is
new), so the server's prefix cache, and its KV offload tiers when it has them
(`moelink serve --kv-offload-host-bytes`), serve them. Levels: one closed loop per
--concurrency value (C clients, each sending its next request when the last
one finished; max(--num-requests, 4·C) requests) and one open loop per
--rates value (Poisson arrivals at that many requests/s; max(--num-requests,
2·rate) requests, so each level sees at least ~2 s of arrivals).

Per level: TTFT (send → first token), ITL (gap between streamed tokens; a
message with k tokens counts as k gaps of 1/k of its wait), TPOT, end-to-end
latency (p50/p90/p99, ms), request and token throughput, and goodput: the
requests/s that met every SLO (--slo-ttft-ms, --slo-tpot-ms, --slo-e2e-ms).
With a metrics URL (--metrics-url, or the started server's own), each level also
reports what it did to the device prefix cache (hit rate) and to each offload
tier (blocks stored, loaded back and their bytes and seconds, evictions: the
difference of two scrapes, benchmarks/offload_metrics.py), beside its TTFT.
Writes JSON and a PNG plot: by default a fresh, git-ignored
benchmarks/runs/serve_load_<device>_<UTC time>.*, so a run never overwrites
the committed results; `--out benchmarks/results/serve_load_cpu.json` is how
those are refreshed, on purpose.
Latencies include the client, which shares the machine with the server on
CPU runs. Over HTTP (--backend openai / openai-chat, benchmarks/serve_http.py) the
prompts are text of --input-len tokens and ITL is the gap between streamed events
(vLLM's benchmark measures the same way); everything else is the same.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from moelink.engine.api.provenance import git_commit as _git_commit

from .server_process import free_port, start_server, stop_server
from .serve_http import BACKENDS
from .serve_pd import PDLevels, split_text
from .offload_metrics import offload_delta, offload_text, scrape_offload
from .spec_metrics import level_delta, scrape

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed: written only when --out names it
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # git-ignored: where runs go by default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help; a help text that already says its default (in words) keeps its own."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--target", default=None, help="HOST:PORT of a running moelink server (default: none; "
                                                     "give this or --model)")
    src.add_argument("--model", default=None, help="start `moelink serve MODEL --port 0` for the run, then stop it "
                                                   "(default: none; give this or --target)")
    p.add_argument("--serve-args", default="", help="extra flags for the server started with --model (default: none)")
    p.add_argument("--backend", choices=("grpc", *BACKENDS), default="grpc",
                   help="grpc: the gRPC services (--protocol); openai: the OpenAI HTTP API's /v1/completions, streamed; "
                        "openai-chat: its /v1/chat/completions (vLLM's `bench serve` names)")
    p.add_argument("--base-url", default=None,
                   help="the OpenAI API of --backend openai / openai-chat: http://HOST:PORT (a /v1 at its end is "
                        "fine) (default: the server started with --model; give one or the other)")
    p.add_argument("--protocol", choices=("native", "vllm"), default="native",
                   help="--backend grpc: moelink.v1.Generation or vllm.grpc.engine.VllmEngine")
    p.add_argument("--concurrency", default="1,4,16,64", help="closed-loop levels, comma separated ('' for none)")
    p.add_argument("--rates", default="20,80,200", help="Poisson arrival rates in req/s ('' for none)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level")
    p.add_argument("--input-len", type=int, default=32, help="prompt token ids per request")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request (EOS ignored)")
    p.add_argument("--prefix-reuse", type=float, default=0.0,
                   help="fraction of requests whose prompt begins with a shared prefix, [0, 1]")
    p.add_argument("--prefix-len", type=int, default=16, help="tokens of each shared prefix (below --input-len)")
    p.add_argument("--num-prefixes", type=int, default=4,
                   help="shared prefixes, drawn uniformly (more than the device cache holds exercises the offload "
                        "tiers)")
    p.add_argument("--slo-ttft-ms", type=float, default=250.0, help="goodput SLO on time to first token")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="goodput SLO on time per output token")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput SLO on end-to-end latency (default: none)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="deadline of each request")
    # Read at run time, not as the default: --help must not print a key.
    p.add_argument("--api-key", default=None, help="the server's --api-key (default: $MOELINK_API_KEY, else none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the Poisson arrivals")
    p.add_argument("--out", default=None, help="JSON path; the plot goes beside it (default: a new "
                                               "benchmarks/runs/serve_load_<device>_<UTC time>.json, git-ignored; "
                                               "the committed benchmarks/results/ files change only when --out "
                                               "names them)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--prefill-target", default=None,
                   help="HOST:PORT of a `moelink serve --role prefill`: --target is then its decode server, each "
                        "request runs as a router runs it (prefill leg, then decode leg with the handoff), and TTFT "
                        "is split into prefill, transfer (from --metrics-url: the decode server's) and first decode")
    p.add_argument("--metrics-url", default=None,
                   help="a running server's Prometheus endpoint (http://HOST:PORT/metrics), scraped around each "
                        "level for speculative decoding's acceptance and the prefix cache's and offload tiers' "
                        "counters (default: none; with --model, the started server's own)")


def output_path(out: Optional[str], device: str, now: Optional[datetime] = None) -> Path:
    """--out, or a fresh timestamped file under RUNS_DIR (git-ignored) named after the device."""
    if out:
        return Path(out)
    tag = device.split(" ")[0].replace("(", "").lower() or "unknown"
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    path = RUNS_DIR / f"serve_load_{tag}_{stamp}.json"
    n = 1
    while path.exists():  # two runs in one second: never overwrite
        path, n = RUNS_DIR / f"serve_load_{tag}_{stamp}_{n}.json", n + 1
    return path


# -- one request ---------------------------------------------------------------
class _Client:
    """Streams one request over either protocol; returns its timings."""

    def __init__(self, channel, protocol: str, api_key: Optional[str], timeout_s: float):
        self.protocol = protocol
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.timeout_s = timeout_s
        if protocol == "native":
            from moelink.engine.server.gen import moelink_v1_pb2 as native_pb, moelink_v1_pb2_grpc as native_grpc

            self.pb, self.stub = native_pb, native_grpc.GenerationStub(channel)
        else:
            from smg_grpc_proto.generated import vllm_engine_pb2 as vllm_pb, vllm_engine_pb2_grpc as vllm_grpc

            self.pb, self.stub = vllm_pb, vllm_grpc.VllmEngineStub(channel)

    def _request(self, rid: str, prompt: list[int], output_len: int, kv_transfer_params_json: Optional[str] = None):
        pb = self.pb
        kv = {} if kv_transfer_params_json is None else dict(kv_transfer_params_json=kv_transfer_params_json)
        if self.protocol == "native":
            return pb.GenerateRequest(request_id=rid, prompt_token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
                temperature=0.0, max_tokens=output_len, ignore_eos=True), **kv)
        return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=prompt), stream=True,
                                  sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True),
                                  **kv)

    def _tokens(self, msg) -> int:
        if self.protocol == "native":
            return len(msg.token_ids)
        return len(msg.chunk.token_ids) if msg.HasField("chunk") else 0

    async def run(self, rid: str, prompt: list[int], output_len: int, kv_transfer_params_json: Optional[str] = None
                  ) -> dict:
        import grpc

        t0 = time.perf_counter()
        ttft, itls, n, last = None, [], 0, t0
        try:
            call = self.stub.Generate(self._request(rid, prompt, output_len, kv_transfer_params_json),
                                      timeout=self.timeout_s, metadata=self.metadata)
            async for msg in call:
                k = self._tokens(msg)
                if not k:
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                    itls.extend([0.0] * (k - 1))  # tokens that arrived together with the first
                else:
                    itls.extend([(now - last) / k] * k)
                n += k
                last = now
        except grpc.aio.AioRpcError as exc:
            return dict(ok=False, error=exc.code().name, start=t0, end=time.perf_counter())
        end = time.perf_counter()
        return dict(ok=n == output_len, error=None if n == output_len else f"got {n} tokens", start=t0, end=end,
                    ttft=ttft, itls=itls, e2e=end - t0, tokens=n,
                    tpot=(end - t0 - ttft) / (n - 1) if n > 1 and ttft is not None else 0.0)


# -- levels ---------------------------------------------------------------------
async def _closed_loop(client: _Client, prompts, output_len: int, concurrency: int, tag: str) -> list[dict]:
    it = iter(enumerate(prompts))
    results = []

    async def worker():
        for i, prompt in it:
            results.append(await client.run(f"{tag}-{i}", prompt, output_len))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _poisson(client: _Client, prompts, output_len: int, rate: float, rng: random.Random, tag: str) -> list[dict]:
    tasks = []
    next_t = time.perf_counter()
    for i, prompt in enumerate(prompts):
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.run(f"{tag}-{i}", prompt, output_len)))
        next_t += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[dict], input_len: int, slo: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    dur = max(end - start, 1e-9)

    def stats(values):
        return {f"p{q}": (None if (v := _pct(values, q)) is None else round(v * 1e3, 3)) for q in (50, 90, 99)} | {
            "mean": round(sum(values) / len(values) * 1e3, 3) if values else None}

    def good(r):
        return ((slo["ttft_ms"] is None or r["ttft"] * 1e3 <= slo["ttft_ms"])
                and (slo["tpot_ms"] is None or r["tpot"] * 1e3 <= slo["tpot_ms"])
                and (slo["e2e_ms"] is None or r["e2e"] * 1e3 <= slo["e2e_ms"]))

    out_tokens = sum(r["tokens"] for r in ok)
    # Over HTTP each answer's usage says its prompt tokens (a chat's template adds some): those are counted.
    in_tokens = sum(r.get("prompt_tokens") or input_len for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    n_good = sum(1 for r in ok if good(r))
    return dict(
        num_requests=len(results), completed=len(ok), errors=errors, duration_s=round(dur, 3),
        request_throughput=round(len(ok) / dur, 3), output_token_throughput=round(out_tokens / dur, 1),
        total_token_throughput=round((out_tokens + in_tokens) / dur, 1),
        goodput=round(n_good / dur, 3), goodput_fraction=round(n_good / len(results), 4),
        ttft_ms=stats([r["ttft"] for r in ok]), itl_ms=stats([x for r in ok for x in r["itls"]]),
        tpot_ms=stats([r["tpot"] for r in ok]), e2e_ms=stats([r["e2e"] for r in ok]),
    )


# -- driver ---------------------------------------------------------------------------
def _levels(spec: str, cast) -> list:
    return [cast(x) for x in spec.split(",") if x.strip()]


async def _run_all(ns, target: str) -> dict:
    import grpc

    from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        md = (("authorization", f"Bearer {ns.api_key}"),) if ns.api_key else None
        info = await pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=md)
        rng = random.Random(ns.seed)
        vocab = info.vocab_size
        specials = set(info.eos_token_ids)

        def tokens(n):
            return [t for t in (rng.randrange(vocab) for _ in range(n * 2)) if t not in specials][:n]

        shared = [tokens(ns.prefix_len) for _ in range(ns.num_prefixes)] if ns.prefix_reuse else []

        def prompts(n):
            out = []
            for _ in range(n):
                head = rng.choice(shared) if shared and rng.random() < ns.prefix_reuse else []
                out.append(head + tokens(ns.input_len - len(head)))
            return out

        async def make_prompts(n):
            return prompts(n)

        client = _Client(channel, ns.protocol, ns.api_key, ns.timeout_s)
        pd = PDLevels(ns, options)  # --prefill-target: two legs per request, TTFT split (benchmarks/serve_pd.py)
        client = await pd.open(client)
        try:
            levels, slo = await _run_levels(ns, client, make_prompts, rng, pd)
        finally:
            await pd.close()
        return dict(model=_model_of(info), device=info.device or "unknown", levels=levels, slo=slo)


def _model_of(info) -> dict:
    return dict(name=info.served_model_name, architecture=info.architecture, dtype=info.dtype, layers=info.num_layers,
                hidden=info.hidden_size, experts=info.num_experts, top_k=info.num_experts_per_tok)


async def _run_levels(ns, client, make_prompts, rng: random.Random, pd) -> tuple[list[dict], dict]:
    """The warm-up, then every level of --concurrency and --rates with `client` (gRPC or HTTP): their summaries."""
    await _closed_loop(client, await make_prompts(4), ns.output_len, 4, "warmup")
    slo = dict(ttft_ms=ns.slo_ttft_ms, tpot_ms=ns.slo_tpot_ms, e2e_ms=ns.slo_e2e_ms)
    levels = []
    url = None if pd.on else ns.metrics_url
    spec = _Scrapes(url, "speculative", scrape, level_delta)
    offload = _Scrapes(url, "offload", scrape_offload, offload_delta)
    for c in _levels(ns.concurrency, int):
        prompts = await make_prompts(max(ns.num_requests, 4 * c))
        t = time.perf_counter()
        spec.begin()
        offload.begin()
        pd.begin()
        res = await _closed_loop(client, prompts, ns.output_len, c, f"c{c}")
        levels.append(dict(mode="closed_loop", concurrency=c, **summarize(res, ns.input_len, slo),
                           **spec.end(), **offload.end(), **pd.end(res)))
        print(_row(levels[-1]), f"({time.perf_counter() - t:.1f} s)", flush=True)
    for r in _levels(ns.rates, float):
        prompts = await make_prompts(max(ns.num_requests, int(2 * r)))
        t = time.perf_counter()
        spec.begin()
        offload.begin()
        pd.begin()
        res = await _poisson(client, prompts, ns.output_len, r, rng, f"r{r:g}")
        levels.append(dict(mode="poisson", rate=r, **summarize(res, ns.input_len, slo), **spec.end(),
                           **offload.end(), **pd.end(res)))
        print(_row(levels[-1]), f"({time.perf_counter() - t:.1f} s)", flush=True)
    return levels, slo


async def _run_all_http(ns, target: Optional[str]) -> dict:
    """The levels through the OpenAI HTTP API at --base-url (benchmarks/serve_http.py). `target`: the server's gRPC
    address when known (a server this run started): its ModelInfo describes the model and device."""
    from .serve_http import HttpClient, OpenAIEndpoint, TextPrompts, served_model

    endpoint = OpenAIEndpoint(ns.base_url, ns.api_key, ns.timeout_s)
    card = await served_model(endpoint)
    rng = random.Random(ns.seed)
    texts = TextPrompts(endpoint, card["id"], rng)
    shared = [await texts.make(ns.prefix_len) for _ in range(ns.num_prefixes)] if ns.prefix_reuse else []

    async def make_prompts(n):
        out = []
        for _ in range(n):
            if shared and rng.random() < ns.prefix_reuse:
                out.append(rng.choice(shared) + await texts.make(ns.input_len - ns.prefix_len))
            else:
                out.append(await texts.make(ns.input_len))
        return out

    levels, slo = await _run_levels(ns, HttpClient(endpoint, ns.backend, card["id"]), make_prompts, rng,
                                    PDLevels(ns, []))
    model, device = dict(name=card["id"], max_model_len=card.get("max_model_len")), "unknown"
    if target is not None:
        import grpc

        from moelink.engine.server.gen import moelink_v1_pb2 as pb, moelink_v1_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            md = (("authorization", f"Bearer {ns.api_key}"),) if ns.api_key else None
            info = await pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=md)
        model, device = dict(_model_of(info), name=card["id"]), info.device or "unknown"
    return dict(model=model, device=device, levels=levels, slo=slo, prompts_cut_by_tokenizer=bool(texts.exact))


class _Scrapes:
    """One set of the server's counters around one level, as `key` of the level's report: `read(url)` before and
    after, `delta(before, after)` (None: nothing to report); nothing without a URL. Speculative decoding's
    (benchmarks/spec_metrics.py), the prefix cache's and offload tiers' (benchmarks/offload_metrics.py)."""

    def __init__(self, url: Optional[str], key: str, read, delta):
        self.url, self.key, self.read, self.delta, self.before = url, key, read, delta, None

    def begin(self) -> None:
        if self.url is not None:
            self.before = self.read(self.url)

    def end(self) -> dict:
        if self.url is None:
            return {}
        d = self.delta(self.before, self.read(self.url))
        return {} if d is None else {self.key: d}


def _row(lv: dict) -> str:
    name = f"C={lv['concurrency']}" if lv["mode"] == "closed_loop" else f"λ={lv['rate']:g}/s"
    return (f"{name:>9}  {lv['request_throughput']:7.1f} req/s {lv['output_token_throughput']:8.0f} tok/s  "
            f"TTFT p50/p99 {lv['ttft_ms']['p50']:7.1f}/{lv['ttft_ms']['p99']:7.1f} ms  "
            f"ITL p50/p99 {lv['itl_ms']['p50']:6.2f}/{lv['itl_ms']['p99']:6.2f} ms  "
            f"E2E p50/p99 {lv['e2e_ms']['p50']:7.1f}/{lv['e2e_ms']['p99']:7.1f} ms  "
            f"goodput {lv['goodput']:6.1f} req/s ({lv['goodput_fraction']:.0%})"
            + (f"  errors {lv['errors']}" if lv["errors"] else "")
            + (f"  spec: {lv['speculative']['mean_accepted_length']:.2f} tok/step, "
               f"{lv['speculative']['acceptance_rate']:.0%} accepted" if "speculative" in lv else "")
            + offload_text(lv) + split_text(lv))


def markdown_table(result: dict) -> str:
    lines = ["| load | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | E2E p50 / p99 (ms) | goodput req/s |",
             "|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        lines.append(f"| {_level_name(lv)} | {lv['request_throughput']:.1f} | {lv['output_token_throughput']:.0f} | "
                     f"{lv['ttft_ms']['p50']:.1f} / {lv['ttft_ms']['p99']:.1f} | {lv['itl_ms']['p50']:.2f} / "
                     f"{lv['itl_ms']['p99']:.2f} | {lv['e2e_ms']['p50']:.1f} / {lv['e2e_ms']['p99']:.1f} | "
                     f"{lv['goodput']:.1f} ({lv['goodput_fraction']:.0%}) |")
    return "\n".join(lines + offload_table(result))


def _level_name(lv: dict) -> str:
    return f"{lv['concurrency']} concurrent" if lv["mode"] == "closed_loop" else f"Poisson {lv['rate']:g} req/s"


def offload_table(result: dict) -> list[str]:
    """The levels' prefix cache and offload tiers beside their TTFT (none when the server reported no tiers)."""
    lvs = [lv for lv in result["levels"] if lv.get("offload")]
    if not lvs:
        return []
    tiers = sorted({t for lv in lvs for t in lv["offload"]["tiers"]}, key=lambda t: (t != "host", t))
    lines = ["", "| load | TTFT p50 / p99 (ms) | device prefix hits | "
             + " | ".join(f"{t}: blocks loaded, MiB, ms/block, stored, evicted" for t in tiers) + " |",
             "|---|---|---|" + "---|" * len(tiers)]
    for lv in lvs:
        o, cells = lv["offload"], []
        for t in tiers:
            d = o["tiers"].get(t, {})
            per = d.get("load_ms_per_block")
            cells.append(f"{d.get('hits', 0):.0f}, {d.get('load_bytes', 0) / 2**20:.2f}, "
                         f"{'-' if per is None else f'{per:.3f}'}, {d.get('stored_blocks', 0):.0f}, "
                         f"{d.get('evictions', 0):.0f}")
        lines.append(f"| {_level_name(lv)} | {lv['ttft_ms']['p50']:.1f} / {lv['ttft_ms']['p99']:.1f} | "
                     f"{o['device_prefix_hit_rate']:.0%} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, marker in (("closed_loop", "o"), ("poisson", "s")):
        lvs = [lv for lv in result["levels"] if lv["mode"] == mode and lv["completed"]]
        if not lvs:
            continue
        x = [lv["output_token_throughput"] for lv in lvs]
        for ax, key, title in zip(axes, ("ttft_ms", "itl_ms", "e2e_ms"), ("TTFT", "inter-token latency", "end-to-end latency")):
            for q, style in (("p50", "-"), ("p99", "--")):
                label = f"{'closed loop' if mode == 'closed_loop' else 'Poisson'} {q}"
                ax.plot(x, [lv[key][q] for lv in lvs], style, marker=marker, label=label)
            for xi, lv in zip(x, lvs):
                ax.annotate(f"C{lv['concurrency']}" if mode == "closed_loop" else f"{lv['rate']:g}/s",
                            (xi, lv[key]["p50"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.set_title(title)
            ax.set_xlabel("output tokens/s")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"moelink serve load — {result['model']['name']} on {result['device']} "
                 f"({result['config']['input_len']} in / {result['config']['output_len']} out, {result['config']['protocol']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def run_from_args(ns: argparse.Namespace) -> int:
    http = ns.backend != "grpc"
    if http:
        if ns.base_url is None and ns.model is None:
            raise ValueError(f"--backend {ns.backend}: give --base-url http://HOST:PORT (a running server's OpenAI "
                             "API) or --model DIR (start one for the run).")
        if ns.base_url is not None and ns.model is not None:
            raise ValueError("--base-url and --model: give one (--model starts a server and benchmarks its own "
                             "OpenAI API).")
        if ns.prefill_target is not None:
            raise ValueError(f"--prefill-target drives a prefill/decode pair over gRPC; --backend {ns.backend} goes "
                             "through the OpenAI API (the gateway's PD mode pairs the legs itself): drop one.")
    elif ns.base_url is not None:
        raise ValueError("--base-url is the OpenAI API of --backend openai / openai-chat; --backend grpc takes "
                         "--target HOST:PORT.")
    elif ns.target is None and ns.model is None:
        raise ValueError("give --target HOST:PORT (a running server) or --model DIR (start one for the run).")
    if ns.num_requests < 1 or ns.input_len < 1 or ns.output_len < 1:
        raise ValueError("--num-requests, --input-len and --output-len must be positive.")
    if not 0 <= ns.prefix_reuse <= 1:
        raise ValueError(f"--prefix-reuse={ns.prefix_reuse} must be in [0, 1] (the fraction of requests that begin "
                         "with a shared prefix).")
    if ns.prefix_reuse and not (1 <= ns.prefix_len < ns.input_len and ns.num_prefixes >= 1):
        raise ValueError(f"--prefix-len={ns.prefix_len} must be in [1, --input-len={ns.input_len}) and "
                         f"--num-prefixes={ns.num_prefixes} >= 1 with --prefix-reuse.")
    if ns.api_key is None:
        ns.api_key = os.environ.get("MOELINK_API_KEY")
    t0 = time.perf_counter()
    proc = None
    target = ns.target
    if ns.model is not None:
        serve_args = ns.serve_args
        if ns.metrics_url is None and "--metrics-port" not in serve_args:
            port = free_port()
            serve_args = f"{serve_args} --metrics-port {port}".strip()
            ns.metrics_url = f"http://127.0.0.1:{port}/metrics"
        http_port = free_port() if http else None
        proc, target = start_server(ns.model, serve_args, http_port=http_port)
        if http:
            ns.base_url = f"http://127.0.0.1:{http_port}"
        print(f"started moelink serve on {target} (pid {proc.pid})"
              + (f", its OpenAI API on {ns.base_url}" if http else ""), flush=True)
    try:
        result = asyncio.run(_run_all_http(ns, target) if http else _run_all(ns, target))
    finally:
        if proc is not None:
            stop_server(proc)
    device = result["device"]
    result["config"] = dict(protocol=ns.protocol if not http else f"{ns.backend} (HTTP {BACKENDS[ns.backend]})",
                            backend=ns.backend, base_url=ns.base_url, input_len=ns.input_len, output_len=ns.output_len,
                            num_requests=ns.num_requests, concurrency=ns.concurrency, rates=ns.rates,
                            prefix_reuse=ns.prefix_reuse, prefix_len=ns.prefix_len, num_prefixes=ns.num_prefixes,
                            serve_args=ns.serve_args,
                            target=ns.base_url if http and ns.model is None else ns.target or "started with --model")
    result["meta"] = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=_git_commit(),
                          host=platform.node(), cpu_count=os.cpu_count(), python=platform.python_version(),
                          client_on_same_host=True, wall_s=round(time.perf_counter() - t0, 1))
    out = output_path(ns.out, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    print(f"wrote {out}")
    if not ns.no_plot:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return 0


def register_cli(subparsers) -> None:
    """`moelink bench-serve`: registered through the `moelink.cli` entry point (pyproject.toml)."""
    b = subparsers.add_parser("bench-serve", help="load benchmark against a running server, over gRPC or its OpenAI "
                                                     "HTTP API (or one it starts)",
                              description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_arguments(b)
    b.set_defaults(func=run_from_args)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
