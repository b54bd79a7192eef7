"""The pure parts of the comparison beside vLLM (benchmarks/peer_vllm.py): one `vllm bench serve` result read,
the medians over rounds and the moelink/vLLM ratios, the greedy outputs compared, and the tables printed. No process
is started here (tests/benchmarks/test_peer_vllm.py checks them on made-up runs)."""
from __future__ import annotations

import statistics
from typing import Optional

ENGINES = ("moelink", "vllm")
# What `vllm bench serve --save-result` writes that the tables read (vLLM's names).
SERVED_METRICS = ("output_throughput", "median_ttft_ms", "median_itl_ms", "median_tpot_ms", "request_throughput")
# Higher is better for these; lower for the latencies (the ratio is moelink/vLLM either way).
HIGHER_BETTER = {"output_throughput", "request_throughput", "output_tok_s"}
BURST_ITL_MS = 0.1


def parse_bench_result(data: dict) -> dict:
    """The measures the tables use from one `vllm bench serve --save-result` JSON, plus its counts."""
    missing = [k for k in SERVED_METRICS if k not in data]
    if missing:
        raise ValueError(f"vllm bench serve's result has no {', '.join(missing)} (keys: {sorted(data)[:20]})")
    out = {k: float(data[k]) for k in SERVED_METRICS}
    # Tokens that reach the client in bursts (a starved server front or client on 2 shared cores): the ITL
    # median falls to ~0 and TTFT grows toward the whole request; such a run is kept, and flagged.
    out["burst"] = out["median_itl_ms"] < BURST_ITL_MS
    for k in ("completed", "failed", "num_prompts", "total_output_tokens", "duration", "max_concurrency",
              "p99_ttft_ms", "p99_itl_ms", "mean_itl_ms"):
        if k in data and data[k] is not None:
            out[k] = data[k]
    return out


def ratio(moelink: Optional[float], vllm: Optional[float]) -> Optional[float]:
    if moelink is None or vllm is None or vllm == 0:
        return None
    return round(moelink / vllm, 3)


def median_of(runs: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize_served(runs: list[dict]) -> list[dict]:
    """One row per (endpoint, concurrency): each engine's median over rounds of each measure and moelink/vLLM."""
    keys = sorted({(r["endpoint"], r["concurrency"]) for r in runs}, key=lambda k: (k[0] != "completions", k[1]))
    rows = []
    for endpoint, conc in keys:
        row: dict = {"endpoint": endpoint, "concurrency": conc}
        for engine in ENGINES:
            mine = [r for r in runs if (r["endpoint"], r["concurrency"], r["engine"]) == (endpoint, conc, engine)
                    and "error" not in r]
            row[engine] = {k: median_of(mine, k) for k in SERVED_METRICS}
            row[engine]["rounds"] = len(mine)
            row[engine]["burst_rounds"] = sum(1 for r in mine if r.get("burst", r["median_itl_ms"] < BURST_ITL_MS))
        row["ratio"] = {k: ratio(row["moelink"][k], row["vllm"][k]) for k in SERVED_METRICS}
        rows.append(row)
    return rows


BURST_NOTE = ("* a round of this engine's run delivered its tokens in bursts (ITL p50 < 0.1 ms: client or server "
              "front starved of CPU); kept in the median")


def summarize_offline(runs: list[dict]) -> dict:
    """Each engine's median tok/s per phase over rounds, moelink/vLLM, and whether the greedy outputs agree."""
    out: dict = {}
    for phase in ("batch1", "full"):
        med = {e: median_of([r[phase] for r in runs if r["engine"] == e and phase in r], "output_tok_s")
               for e in ENGINES}
        out[phase] = {**med, "ratio": ratio(med["moelink"], med["vllm"])}
    out["greedy"] = compare_outputs(runs)
    return out


def compare_outputs(runs: list[dict]) -> dict:
    """Token-for-token comparison of the first round's greedy outputs of the two engines (both phases)."""
    first = {}
    for r in runs:
        if "outputs_full" in r and r["engine"] not in first:
            first[r["engine"]] = r
    if len(first) < 2:
        return {"compared": 0}
    res: dict = {}
    for phase in ("outputs_batch1", "outputs_full"):
        a, b = first["moelink"][phase], first["vllm"][phase]
        same = sum(1 for x, y in zip(a, b) if x == y)
        diverge = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                   for x, y in zip(a, b) if x != y]
        res[phase.removeprefix("outputs_")] = {"identical": same, "of": len(a),
                                              "first_divergence_positions": diverge[:16]}
    res["all_identical"] = all(v["identical"] == v["of"] for v in res.values() if isinstance(v, dict))
    return res


def format_served(rows: list[dict]) -> str:
    lines = ["| endpoint | conc | engine | out tok/s | TTFT p50 ms | ITL p50 ms | TPOT p50 ms | req/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for engine in (*ENGINES, "ratio"):
            m = row[engine]
            name = "moelink/vLLM" if engine == "ratio" else engine + ("*" if m.get("burst_rounds") else "")

            def cell(k):
                v = m.get(k)
                if v is None:
                    return "-"
                return f"{v:.2f}x" if engine == "ratio" else f"{v:.2f}" if v < 10 else f"{v:.1f}"
            lines.append(f"| {row['endpoint']} | {row['concurrency']} | {name} | {cell('output_throughput')} | "
                         f"{cell('median_ttft_ms')} | {cell('median_itl_ms')} | {cell('median_tpot_ms')} | "
                         f"{cell('request_throughput')} |")
    return "\n".join(lines)


def format_offline(summary: dict, runs: list[dict]) -> str:
    lines = ["| phase | moelink tok/s (rounds) | vLLM tok/s (rounds) | moelink median | vLLM median | moelink/vLLM |",
             "|---|---|---|---|---|---|"]
    for phase in ("batch1", "full"):
        per = {e: ", ".join(f"{r[phase]['output_tok_s']:.0f}" for r in runs if r["engine"] == e and phase in r)
               for e in ENGINES}
        s = summary[phase]
        fmt = lambda v, spec=".1f", suf="": "-" if v is None else f"{v:{spec}}{suf}"  # noqa: E731
        lines.append(f"| {phase} | {per['moelink']} | {per['vllm']} | {fmt(s['moelink'])} | {fmt(s['vllm'])} | "
                     f"{fmt(s['ratio'], '.2f', 'x')} |")
    return "\n".join(lines)


__all__ = ["BURST_ITL_MS", "BURST_NOTE", "ENGINES", "HIGHER_BETTER", "SERVED_METRICS", "compare_outputs", "format_offline", "format_served", "median_of", "parse_bench_result", "ratio", "summarize_offline", "summarize_served"]
