"""Prometheus metrics of one engine (`moelink serve --metrics-port`).

Request-level series (outcomes, TTFT / inter-token / end-to-end histograms,
token counters) are observed by the engine thread as outputs are produced.
Engine-level series (queue, KV use, prefix cache, preemptions, all-to-all,
expert-load balance) are read from the engine when Prometheus scrapes, by a
custom collector, so no per-step work is spent on them.

Cardinality stays bounded: labels are outcomes, phases and MoE layer indices,
never request ids and, by default, never expert ids (per-expert counts are in
the `ExpertLoad` RPC / `moelink stats`).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_THROUGHPUT_WINDOW_S = 10.0


class EngineMetrics:
    """Owns a registry; `LLMEngine` calls `on_outputs` from its thread, Prometheus scrapes `registry`."""

    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter("moelink_requests", "Finished requests by outcome (finish reason).",
                                ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("moelink_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry)
        self.generation_tokens = Counter("moelink_generation_tokens", "Generated tokens.", registry=self.registry)
        self.ttft = Histogram("moelink_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("moelink_inter_token_latency_seconds", "Time between a request's tokens.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("moelink_e2e_request_latency_seconds", "Arrival to last output.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._last_token: dict[str, tuple[float, int]] = {}  # request id → (time, tokens so far)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the tokens/s gauge
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(self))

    def on_outputs(self, outputs) -> None:
        """Observe RequestOutputs just produced (cumulative or delta kind)."""
        now = time.monotonic()
        new_total = 0
        for out in outputs:
            comp = out.outputs[0]
            arrival = out.metrics.get("arrival_time") or now
            prev_t, prev_n = self._last_token.get(out.request_id, (None, 0))
            delta = out.metrics.get("output_kind") == "delta"
            n_now = prev_n + len(comp.token_ids) if delta else len(comp.token_ids)
            gained = n_now - prev_n
            if gained > 0:
                new_total += gained
                if prev_t is None:
                    self.ttft.observe(max(now - arrival, 0.0))
                else:
                    gap = (now - prev_t) / gained
                    for _ in range(gained):
                        self.itl.observe(gap)
                self._last_token[out.request_id] = (now, n_now)
            if out.finished:
                self._last_token.pop(out.request_id, None)
                self.requests.labels(comp.finish_reason or "unknown").inc()
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.e2e.observe(max(now - arrival, 0.0))
        if new_total:
            self.generation_tokens.inc(new_total)
            with self._lock:
                self._recent.append((now, new_total))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > _THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / _THROUGHPUT_WINDOW_S


class _EngineCollector:
    """Reads the engine's counters at scrape time (read-only; values are plain ints and floats)."""

    def __init__(self, metrics: EngineMetrics):
        self.m = metrics

    def collect(self):
        eng = self.m.engine
        st = eng.stats()
        yield _gauge("moelink_num_requests_running", "Requests scheduled on the ranks.", st.num_running)
        yield _gauge("moelink_num_requests_waiting", "Requests waiting for KV blocks or budget.", st.num_waiting)
        yield _gauge("moelink_kv_cache_usage_ratio", "Fraction of KV blocks held by requests.", st.kv_usage)
        yield _gauge("moelink_kv_cache_free_blocks", "KV blocks not held by any request.", st.num_free_blocks)
        yield _gauge("moelink_kv_cache_total_blocks", "KV blocks in all ranks' pools.", st.num_total_blocks)
        yield _gauge("moelink_prefix_cache_hit_rate", "Prefix-cache hit tokens over looked-up tokens.",
                     st.prefix_cache_hit_rate)
        yield _counter("moelink_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                       st.prefix_cache_queries)
        yield _counter("moelink_prefix_cache_hits", "Prompt tokens found in the prefix cache.", st.prefix_cache_hits)
        yield _counter("moelink_num_preemptions", "Requests preempted (recomputed) for lack of KV blocks.",
                       st.num_preemptions_total)
        yield _gauge("moelink_generation_tokens_per_second", f"Generated tokens/s over the last {_THROUGHPUT_WINDOW_S:.0f} s.",
                     self.m.tokens_per_second())
        yield from self._moe(eng)

    def _moe(self, eng):
        moe = eng.moe_metrics
        b = CounterMetricFamily("moelink_all_to_all_bytes", "All-to-all payload bytes sent.", labels=["direction"])
        b.add_metric(["dispatch"], moe.bytes_dispatched)
        b.add_metric(["combine"], moe.bytes_combined)
        yield b
        t = CounterMetricFamily("moelink_moe_seconds", "Host time of the MoE phases (CPU ranks; slowest rank per step).",
                                labels=["phase"])
        t.add_metric(["dispatch"], moe.dispatch_s)
        t.add_metric(["compute"], moe.compute_s)
        t.add_metric(["combine"], moe.combine_s)
        yield t
        counts = moe.tokens_per_expert.tolist()
        yield _counter("moelink_expert_tokens", "Routed (token, expert) pairs, all layers and ranks.",
                       sum(map(sum, counts)))
        expert = GaugeMetricFamily("moelink_expert_load_max_over_mean",
                                   "Per MoE layer: busiest expert's tokens over the mean (1 = even).", labels=["layer"])
        rank = GaugeMetricFamily("moelink_rank_load_max_over_mean",
                                 "Per MoE layer: busiest rank's tokens over the mean (1 = even).", labels=["layer"])
        experts_of_rank = eng.experts_on_ranks()
        for layer, row in enumerate(counts):
            total = sum(row)
            expert.add_metric([str(layer)], (max(row) * len(row) / total) if total else 0.0)
            per_rank = [sum(row[e] / n for e, n in held) for held in experts_of_rank]
            rank.add_metric([str(layer)], (max(per_rank) * len(per_rank) / total) if total else 0.0)
        yield expert
        yield rank


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c
