"""`engine_e2e`'s result document: its rows side by side (end-to-end against graph-only, where the host's time
per step went), the tables it prints, and its writer (`Recorder`: rewritten after every point, and ended by a
watchdog, recorded as hung, when a point overstays its deadline by the grace).

Per decode-heavy row, against the graph-only step of the same model, dtype and batch:
- ratio = e2e output tok/s / graph-only tok/s (the whole LLM.generate call: prefill, decode, finishing);
- decode_step_ratio = graph-only step ms / median full-batch step ms (the decode steps alone);
- exposed_ms_per_step = median full-batch step ms - graph-only step ms: what each step costs beyond the GPU's
  own work (the planner's fixed cost per step, `planner/step_cost.py`);
- host_ms_per_step and overlapped_ms: the host's own work per step and how much of it ran while the device
  worked. From the engine when it counts its waits for the device (`LLMEngine.loop_stats`: host = mean step
  wall - mean wait; overlapped = graph-only ms - wait, at most host); otherwise derived from the loop pair:
  host = the serial loop's step ms - graph-only ms; overlapped = serial step ms - this row's step ms.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path

from moelink.engine.api.provenance import write_result

HOST_FROM_ENGINE = ("engine: host ms/step = mean step wall - mean wait for the device (LLMEngine.loop_stats); "
                    "overlapped = graph-only ms - wait")
HOST_DERIVED = ("derived (the engine exposes no per-step host timing): host ms/step = the serial loop's wall ms "
                "per step - the graph-only device ms; overlapped = serial step ms - this loop's step ms")


def _key(r: dict) -> tuple:
    return r["model"], r["dtype"], r["batch"]


def derive(rows: list[dict]) -> str | None:
    """Fill the side-by-side fields of every decode-heavy row that has its graph-only step; returns the host
    timing source used (None when no row had one)."""
    graph = {_key(r): r for r in rows if r["part"] == "graph" and r.get("graph_ms")}
    gen = [r for r in rows if r["part"] == "generate" and r["workload"] == "decode" and not r.get("error")]
    # The serial loop: async_scheduling=False, or None where the engine has only that one.
    serial = {_key(r): r for r in gen if r["async_scheduling"] is not True}
    sources = set()
    for r in gen:
        g = graph.get(_key(r))
        if g is None:
            continue
        gms = g["graph_ms"]
        r.update(graph_ms=gms, graph_tok_s=g["graph_tok_s"], ratio=r["e2e_tok_s"] / g["graph_tok_s"],
                 decode_step_ratio=gms / r["step_ms"], exposed_ms_per_step=r["step_ms"] - gms)
        ls = r.get("loop_stats_per_step") or {}
        if "wait_ms" in ls:
            host = max(0.0, r["step_ms_mean"] - ls["wait_ms"])
            overlapped = min(host, max(0.0, gms - ls["wait_ms"]))
            sources.add(HOST_FROM_ENGINE)
        else:
            s = serial.get(_key(r))
            if s is None:
                continue
            host = max(0.0, s["step_ms"] - gms)
            overlapped = 0.0 if s is r else min(host, max(0.0, s["step_ms"] - r["step_ms"]))
            sources.add(HOST_DERIVED)
        r.update(host_ms_per_step=host, overlapped_ms=overlapped,
                 overlapped_fraction=overlapped / host if host > 0 else None,
                 host_source="engine" if "wait_ms" in ls else "derived")
    return " | ".join(sorted(sources)) or None


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _loop(a) -> str:
    return {True: "async", False: "serial", None: "default"}[a]


def engine_table(rows: list[dict]) -> str:
    lines = ["| model | dtype | workload | batch | loop | e2e out tok/s | graph-only tok/s | e2e/graph | step ms "
             "| graph ms | host ms/step | overlapped ms |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["part"] == "graph":
            lines.append(f"| {r['model']} | {r['dtype']} | graph-only | {r['batch']} | - | - | "
                         f"{_f(r.get('graph_tok_s'), '.0f')} | - | - | {_f(r.get('graph_ms'), '.2f')} | - | - |"
                         + (f" error: {r['error'][:80]}" if r.get("error") else ""))
        elif r["part"] == "generate":
            if r.get("error"):
                lines.append(f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['batch']} | "
                             f"{_loop(r['async_scheduling'])} | error: {r['error'][:100]} |")
                continue
            lines.append(f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['batch']} | "
                         f"{_loop(r['async_scheduling'])} | {r['e2e_tok_s']:.0f} | {_f(r.get('graph_tok_s'), '.0f')} | "
                         f"{_f(r.get('ratio'), '.2f')} | {r['step_ms']:.2f} | {_f(r.get('graph_ms'), '.2f')} | "
                         f"{_f(r.get('host_ms_per_step'), '.2f')} | {_f(r.get('overlapped_ms'), '.2f')} |")
        elif r["part"] == "startup" and r.get("error"):
            lines.append(f"| {r['model']} | {r['dtype']} | engine start | - | {_loop(r['async_scheduling'])} | "
                         f"error: {r['error'][:100]} |")
    return "\n".join(lines)


def serve_table(rows: list[dict]) -> str:
    lines = ["| model | dtype | concurrent | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | first request TTFT ms "
             "| server start s |", "|---|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        if r["part"] != "serve":
            continue
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['dtype']} | {r.get('concurrency', '-')} | error: {r['error'][:100]} |")
            continue
        lines.append(f"| {r['model']} | {r['dtype']} | {r['concurrency']} | {r['out_tok_s']:.0f} | "
                     f"{_f(r['ttft_ms']['p50'])} / {_f(r['ttft_ms']['p99'])} | {_f(r['itl_ms']['p50'], '.2f')} / "
                     f"{_f(r['itl_ms']['p99'], '.2f')} | {_f(r.get('first_request_ttft_ms'))} | "
                     f"{_f(r.get('startup_s'))} |")
    return "\n".join(lines)


# -- the document ------------------------------------------------------------------------------------------------------
class Recorder:
    """The result document, rewritten after every point; and the watchdog that ends a hung run."""

    def __init__(self, doc: dict, out: Path, grace_s: float):
        self.doc, self.out, self.grace_s = doc, out, grace_s
        self._lock = threading.Lock()
        self._armed: tuple[float, dict] | None = None
        self._closed = False
        threading.Thread(target=self._watch, name="engine-e2e-watchdog", daemon=True).start()

    def add(self, row: dict) -> dict:
        with self._lock:
            self.doc["rows"].append(row)
            self.save()
        return row

    def save(self) -> None:
        self.doc["host_timing"] = derive(self.doc["rows"])
        write_result(self.out, self.doc)

    def arm(self, deadline: float, row: dict) -> None:
        self._armed = (deadline + self.grace_s, row)

    def disarm(self) -> None:
        self._armed = None

    def close(self) -> None:
        self._closed = True

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            armed = self._armed
            if armed and time.monotonic() > armed[0]:
                row = dict(armed[1], error=f"hung: still running {self.grace_s:.0f} s past its deadline; the run "
                                           "was ended here (points after it did not run)")
                faulthandler.dump_traceback(all_threads=True)
                with self._lock:
                    self.doc["rows"].append(row)
                    self.save()
                print(f"engine_e2e: a point hung ({row}); wrote {self.out} and ended the run", flush=True)
                os._exit(3)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
