"""Prometheus metrics of one engine (`moelink serve --metrics-port`).

Request-level series (outcomes, TTFT / inter-token / end-to-end histograms,
token counters) are observed by the AsyncEngine's output thread as outputs are produced.
Engine-level series (queue, KV use, prefix cache, preemptions, all-to-all,
expert-load balance, the KV offload tiers' counters) are read from the engine when Prometheus scrapes, by a
custom collector, so no per-step work is spent on them. The offload tiers are reached through the engine's KV
connector (`engine.config.kv_connector`) when it is an `OffloadStatsSource` (below: a typed protocol, since
engine/core must not import engine/kv_transfer); their load-time histogram is observed as loads happen when the
connector also takes an observer (`OffloadLoadObserved`).

Cardinality stays bounded: labels are outcomes, phases and MoE layer indices,
never request ids and, by default, never expert ids (per-expert counts are in
the `ExpertLoad` RPC / `moelink stats`).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Mapping, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .metrics_server import BoundedMetricsServer, start_metrics_server as _start
from .vllm_metrics import VllmMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# One offload load (a request's blocks: copies from host memory, or a disk read first): microseconds to seconds.
_OFFLOAD_LOAD_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
OFFLOAD_TIERS = ("host", "disk")  # the `tier` label's values, highest first
_THROUGHPUT_WINDOW_S = 10.0
# The /metrics HTTP server: at most this many requests served at once (one thread each; more are closed at
# once), and each connection at most this long, however slowly its client sends (a scrape takes
# milliseconds). Connections still sending their request hold no thread (metrics_server.py).
METRICS_MAX_CONNECTIONS = 16
METRICS_CONNECTION_TIMEOUT_S = 10.0


class EngineMetrics:
    """Owns a registry; the AsyncEngine that takes it (`AsyncEngine(..., metrics=EngineMetrics())`) attaches
    its LLMEngine and calls `on_outputs` from its output thread; Prometheus scrapes `registry`."""

    def __init__(self):
        self.engine = None  # set once by `attach`; engine-level series are empty until then
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
        # Observed by the KV connector's offload tiers as each load ends (attach hands it `observe_offload_load`).
        self.offload_load = Histogram("moelink_kv_offload_load_seconds", "Seconds each load from an offload tier "
                                      "took (a request's blocks found there, copied back to the device), per tier.", ["tier"],
                                      buckets=_OFFLOAD_LOAD_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(self))
        self.vllm: VllmMetrics | None = None  # vLLM's series (attach_vllm), observed beside moelink's own

    def attach_vllm(self, model_name: str, max_model_len: int) -> VllmMetrics:
        """vLLM 0.32's series (engine/core/vllm_metrics.py) on this registry, labelled `model_name`, observed from
        now on beside moelink's own; once."""
        if self.vllm is None:
            self.vllm = VllmMetrics(self.registry, model_name, max_model_len, self.engine)
        return self.vllm

    def attach(self, engine) -> None:
        """The engine (an LLMEngine) whose counters the scrape reads; called once by the AsyncEngine. A KV
        connector that reports its offload loads one by one (`OffloadLoadObserved`) is handed the histogram."""
        if self.engine is not None and self.engine is not engine:
            raise ValueError("EngineMetrics is already attached to another engine: make one per engine.")
        if self.engine is None:
            kvc = getattr(engine.config, "kv_connector", None)
            if isinstance(kvc, OffloadLoadObserved):
                kvc.observe_offload_loads(self.observe_offload_load)
        self.engine = engine
        if self.vllm is not None:
            self.vllm.engine = engine

    def observe_offload_load(self, tier: str, seconds: float) -> None:
        """One load from offload tier `tier` ("host" or "disk") took `seconds` (any thread)."""
        self.offload_load.labels(tier).observe(seconds)

    def on_outputs(self, outputs) -> None:
        """Observe RequestOutputs just produced (cumulative or delta kind)."""
        now = time.monotonic()
        new_total = 0
        vllm = self.vllm
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
                    if vllm is not None:
                        vllm.first_token(max(now - arrival, 0.0), out.num_cached_tokens)
                else:
                    gap = (now - prev_t) / gained
                    for _ in range(gained):
                        self.itl.observe(gap)
                    if vllm is not None:
                        vllm.token_gaps(gap, gained)
                self._last_token[out.request_id] = (now, n_now)
            if out.finished:
                self._finished(out, now, arrival, n_now)
        if new_total:
            self.generation_tokens.inc(new_total)
            if vllm is not None:
                vllm.generated(new_total)
            with self._lock:
                self._recent.append((now, new_total))

    def _finished(self, out, now: float, arrival: float, generated: int) -> None:
        self._last_token.pop(out.request_id, None)
        reason = out.outputs[0].finish_reason
        self.requests.labels(reason or "unknown").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.e2e.observe(max(now - arrival, 0.0))
        if self.vllm is not None:
            first = out.metrics.get("first_token_time")
            self.vllm.finished(reason, len(out.prompt_token_ids), out.num_cached_tokens, generated,
                               max(now - arrival, 0.0), max(now - first, 0.0) if first is not None else 0.0)
            scheduled = out.metrics.get("scheduled_time")
            if scheduled is not None:
                self.vllm.phases(scheduled - arrival, (first - scheduled) if first is not None else None,
                                 now - scheduled, out.metrics.get("num_preemptions", 0))

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
        if eng is None:
            return
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
        yield from self._elastic(eng.elastic_stats)
        grammars = getattr(eng, "grammars", None)
        if grammars is not None:
            yield from grammar_families(grammars)
        if st.kv_transfer is not None:
            yield from kv_transfer_families(st.kv_transfer, eng.config)
        if st.spec_decode is not None:
            yield from spec_decode_families(st.spec_decode)
        kvc = getattr(eng.config, "kv_connector", None)
        if isinstance(kvc, OffloadStatsSource):
            yield from offload_families(kvc.offload_tier_stats())
        yield from self._moe(eng)
        if getattr(eng, "multimodal", None) is not None:
            yield from multimodal_families(eng.mm_stats)

    @staticmethod
    def _elastic(es):
        """Elastic EP (engine/cluster/elastic.py): ranks lost, recoveries and their time, requests recomputed."""
        for field, doc in _ELASTIC_COUNTERS.items():
            yield _counter("moelink_ep_" + field.removesuffix("_total"), doc, getattr(es, field))

    def _moe(self, eng):
        moe = eng.moe_metrics
        b = CounterMetricFamily("moelink_all_to_all_bytes", "All-to-all payload bytes sent.", labels=["direction"])
        b.add_metric(["dispatch"], moe.bytes_dispatched)
        b.add_metric(["combine"], moe.bytes_combined)
        yield b
        yield _counter("moelink_all_to_all_inter_node_bytes",
                       "Dispatch payload bytes that crossed between nodes (two_level all-to-all; combine returns as "
                       "many); included in moelink_all_to_all_bytes.", moe.bytes_inter_node)
        yield _counter("moelink_all_to_all_inter_node_rows",
                       "Dispatch rows that crossed between nodes: one per (token, destination node other than the "
                       "sender's).", moe.inter_node_rows)
        if moe.per_mode:
            # Per dispatch mode (comm/ep_modes.py): payload vs wire (padding included) bytes of dispatch.
            mb = CounterMetricFamily("moelink_all_to_all_mode_bytes", "Dispatch bytes per mode: payload rows, and "
                                     "the wire's fixed blocks (padding included).", labels=["mode", "kind"])
            ms = CounterMetricFamily("moelink_all_to_all_mode_steps", "Engine steps per dispatch mode.", labels=["mode"])
            for mode, c in sorted(moe.per_mode.items()):
                mb.add_metric([mode, "payload"], c["bytes"])
                mb.add_metric([mode, "wire"], c["wire_bytes"])
                ms.add_metric([mode], c["steps"])
            yield mb
            yield ms
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
        eplb = eng.eplb
        if eplb is not None:  # online EPLB (--eplb-interval)
            yield from eplb_families(eplb.snapshot())


# What became of structured-output grammar compiles (engine/core/grammar_compile.py: GrammarCompilerPool.counts).
GRAMMAR_OUTCOMES = ("compiled", "failed", "timed_out", "abandoned_queued", "abandoned_starting", "abandoned_running",
                    "refused_full", "refused_too_long")


def multimodal_families(s):
    """Images and videos (engine/multimodal/stats.MultimodalStats): per request at intake, the vision towers' work
    on the ranks."""
    yield _counter("moelink_mm_requests", "Requests admitted with images or videos.", s.requests)
    yield _counter("moelink_mm_images", "Images those requests carried.", s.images)
    yield _counter("moelink_mm_videos", "Videos those requests carried.", s.videos)
    yield _counter("moelink_mm_encoder_images", "Images and videos the ranks' vision towers encoded (under TP, once "
                                                "per rank of the group).", s.images_encoded)
    yield _counter("moelink_mm_encoder_cache_hits", "Images and videos the ranks' encoder caches answered.",
                   s.encoder_cache_hits)
    yield _counter("moelink_mm_encoder_seconds", "Seconds the ranks' vision towers spent encoding.", s.encoder_s)


def grammar_families(pool):
    """Grammar compiles by outcome (abandoned_*: every client left, so it was dropped or killed), and how many
    wait for a compile process now."""
    c = CounterMetricFamily("moelink_grammar_compiles", "Grammar compiles by outcome: compiled, failed (did not "
                            "compile), timed_out, abandoned_queued / abandoned_starting / abandoned_running (every "
                            "client left: dropped, or its process killed), refused_full, refused_too_long.",
                            labels=["outcome"])
    counts = dict(pool.counts)
    for outcome in GRAMMAR_OUTCOMES:
        c.add_metric([outcome], counts.get(outcome, 0))
    yield c
    yield _gauge("moelink_grammar_compiles_queued", "Grammar compiles waiting for a compile process.", pool.queued())


def spec_decode_families(sd):
    """Speculative decoding (scheduler/spec_decode.py), named as vLLM names them: verify rows, drafts verified,
    drafts accepted (in all and per draft position), and the acceptance rate and mean accepted length."""
    yield _counter("moelink_spec_decode_num_drafts", "Request-steps that verified at least one draft token.",
                   sd.num_verify_rows)
    yield _counter("moelink_spec_decode_num_draft_tokens", "Draft tokens verified.", sd.num_draft_tokens)
    yield _counter("moelink_spec_decode_num_accepted_tokens", "Draft tokens accepted.", sd.num_accepted_tokens)
    per_pos = CounterMetricFamily("moelink_spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted at each draft position (0: the first draft).",
                                  labels=["position"])
    for i, n in enumerate(sd.accepted_per_position):
        per_pos.add_metric([str(i)], n)
    yield per_pos
    yield _gauge("moelink_spec_decode_acceptance_rate", "Accepted over verified draft tokens, since start.",
                 sd.acceptance_rate)
    yield _gauge("moelink_spec_decode_mean_accepted_length", "Tokens a verifying request emits per step (its "
                 "accepted drafts and one more), since start.", sd.mean_accepted_length)


def eplb_families(m: dict):
    """Online EPLB's metric families from its controller's snapshot (engine/cluster/eplb_controller.py)."""
    yield _counter("moelink_eplb_rebalances", "Online EPLB re-placements applied.", m["rebalances"])
    yield _counter("moelink_eplb_expert_bytes_moved", "Expert weight bytes sent between ranks by online "
                   "EPLB.", m["bytes_moved"])
    g = GaugeMetricFamily("moelink_eplb_rank_imbalance", "Max over mean expert load per rank (layers "
                          "averaged) around the last re-placement: predicted by EPLB, and measured (pairs "
                          "each rank's experts computed) over the window before and since the switch.",
                          labels=["kind", "when"])
    for kind in ("predicted", "measured"):
        for when in ("before", "after"):
            value = m[f"{kind}_imbalance_{when}"]
            if value is not None:
                g.add_metric([kind, when], value)
    yield g
    yield _counter("moelink_eplb_expert_bytes_staged", "Expert weight bytes staged by online EPLB's move "
                   "chunks (all ranks).", m["bytes_staged"])
    yield _gauge("moelink_eplb_staging_peak_bytes", "The most expert weight bytes one rank staged in one move "
                 "chunk.", m["peak_staged_bytes"])
    if m["staging_budget_bytes"] is not None:
        yield _gauge("moelink_eplb_staging_budget_bytes", "Staging bound of one move chunk per rank "
                     "(--eplb-staging-mb).", m["staging_budget_bytes"])
    yield _counter("moelink_eplb_plans_refused", "Online EPLB placements not applied: a layer would stage more "
                   "than --eplb-staging-mb.", m["plans_refused"])
    yield _gauge("moelink_eplb_longest_move_chunk_seconds", "Longest pause between two steps spent "
                 "moving expert weights.", m["longest_move_chunk_s"])


# The ElasticStats counters exported, each as moelink_ep_<field> (a `_total` suffix dropped), with its help.
_ELASTIC_COUNTERS = {
    "rank_losses": "Expert-parallel ranks lost (killed, actor lost, silent).",
    "recoveries": "Rank losses the engine recovered from (serving on at EP N-1).",
    "failed_recoveries": "Rank losses the engine could not recover from (it failed).",
    "recovery_seconds_total": "Time spent recovering from lost ranks (the step paused).",
    "requests_requeued": "Unfinished requests requeued and recomputed by recoveries and rejoins.",
    "recoveries_keeping_runners": "Recoveries whose survivors kept their model runners and KV caches (only the "
                                  "lost ranks' requests recomputed).",
    "rank_rejoins": "Replacement ranks admitted (the group back to EP N).",
    "rejoin_seconds_total": "Time spent admitting replacement ranks (the step paused).",
    "failed_rejoins": "Admissions that failed midway (the engine fell back to a recovery).",
}


def kv_transfer_families(c, config):
    """Prefill/decode disaggregation's handoffs (scheduler/kv_connector.py counters), labelled with this
    engine's kv_role so the prefill and decode pools' series stay apart on one dashboard."""
    from ..config.kv_sizing import kv_cache_bytes_per_token

    role = getattr(config.kv_connector, "kv_role", "")
    bytes_per_token = kv_cache_bytes_per_token(config.model)

    def counter(name, doc, value, labels=(), values=()):
        fam = CounterMetricFamily(name, doc, labels=["role", *labels])
        fam.add_metric([role, *values], value)
        return fam

    loads = CounterMetricFamily("moelink_kv_transfer_loads", "Requests whose prompt KV a load was started for, by "
                                "result (failed: recomputed here).", labels=["role", "result"])
    loads.add_metric([role, "ok"], c.loads_ok)
    loads.add_metric([role, "failed"], c.loads_failed)
    yield loads
    yield counter("moelink_kv_transfer_tokens_loaded", "Prompt tokens whose KV was loaded, not computed.",
                  c.tokens_loaded)
    yield counter("moelink_kv_transfer_bytes_loaded", "Bytes of prompt KV loaded (tokens x the cache's bytes per "
                  "token over all layers).", c.tokens_loaded * bytes_per_token)
    yield counter("moelink_kv_transfer_load_seconds", "Seconds loads spent from the blocks' reservation to the "
                  "report (queue, fetch and write; / loads = the mean time a request waits for its KV).",
                  c.load_wait_s)
    yield counter("moelink_kv_transfer_saves", "Requests whose prompt KV this engine saved and handed off.", c.saves)
    holds = CounterMetricFamily("moelink_kv_transfer_holds_ended", "Saves held in the KV cache (NIXL) whose hold "
                                "ended, by result (read: a fetch claimed it; unread: expired, or released oldest "
                                "first for newer holds past --kv-nixl-hold-fraction or a client's share).",
                                labels=["role", "result"])
    holds.add_metric([role, "read"], getattr(c, "holds_read", 0))
    holds.add_metric([role, "unread"], getattr(c, "holds_unread", 0))
    yield holds
    held = GaugeMetricFamily("moelink_kv_transfer_held_blocks", "KV blocks held by saves waiting for their decode "
                             "engine now.", labels=["role"])
    held.add_metric([role], getattr(c, "held_blocks", 0))
    yield held


# -- the KV offload tiers (engine/kv_transfer/offload*.py), through typed protocols -----------------------------
class OffloadTierCounters(Protocol):
    """One offload tier's counters since start, as engine/kv_transfer/offload_tiers.py's `TierStats` names them:
    blocks stored in the tier, blocks found there and loaded back (`hits`), their bytes and seconds, and blocks
    pushed out of it (to the tier below, or dropped from the last). Optional, read when present: `stored_bytes`
    (bytes stored in the tier since start), `held_bytes` (bytes it holds now) and `failed` (blocks dropped because
    the copy that wrote or read them failed)."""

    stored: int
    hits: int
    loaded_bytes: int
    load_s: float
    evicted: int


@runtime_checkable
class OffloadStatsSource(Protocol):
    """A KV connector with offload tiers, as the metrics read it (at scrape time, from the scrape's thread)."""

    def offload_tier_stats(self) -> Mapping[str, OffloadTierCounters]:
        """Per tier ("host", "disk"), its counters; a tier the connector does not have may be left out."""


@runtime_checkable
class OffloadLoadObserved(Protocol):
    """A KV connector that reports each offload load as it ends (for the load-time histogram)."""

    def observe_offload_loads(self, observer: Callable[[str, float], None]) -> None:
        """Call `observer(tier, seconds)` after every load from a tier, from whichever thread loads."""


# Series per tier, named as vLLM's offloading connector names its own (vllm:kv_offload_*): field -> (name, help).
_OFFLOAD_COUNTERS = {
    "stored": ("moelink_kv_offload_stored_blocks", "KV blocks stored in the tier (from the device, or pushed down "
                                                   "from the tier above)."),
    "stored_bytes": ("moelink_kv_offload_store_bytes", "Bytes of KV blocks stored in the tier."),
    "hits": ("moelink_kv_offload_block_hits", "KV blocks found in the tier and loaded back instead of recomputed."),
    "loaded_bytes": ("moelink_kv_offload_load_bytes", "Bytes of KV blocks loaded back from the tier."),
    "load_s": ("moelink_kv_offload_load_time_seconds", "Seconds spent loading KV blocks back from the tier (the "
                                                       "sum of moelink_kv_offload_load_seconds)."),
    "evicted": ("moelink_kv_offload_block_evictions", "KV blocks pushed out of the tier (host: down to disk, or "
                                                      "dropped without one; disk: deleted)."),
    "failed": ("moelink_kv_offload_failed_blocks", "KV blocks dropped from the tier because the copy that wrote or "
                                                   "read them failed (a full or failing disk), never served."),
}


def offload_families(per_tier: Mapping[str, OffloadTierCounters]):
    """The offload tiers' counters (and, where the tiers report it, the bytes each holds now), labelled `tier`."""
    tiers = [t for t in OFFLOAD_TIERS if t in per_tier] + sorted(set(per_tier) - set(OFFLOAD_TIERS))
    for field, (name, doc) in _OFFLOAD_COUNTERS.items():
        fam = CounterMetricFamily(name, doc, labels=["tier"])
        for t in tiers:
            value = getattr(per_tier[t], field, None)
            if value is not None:
                fam.add_metric([t], value)
        if fam.samples:
            yield fam
    held = GaugeMetricFamily("moelink_kv_offload_held_bytes", "Bytes of KV blocks the tier holds now.",
                             labels=["tier"])
    for t in tiers:
        value = getattr(per_tier[t], "held_bytes", None)
        if value is not None:
            held.add_metric([t], value)
    if held.samples:
        yield held


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


# -- the /metrics endpoint ------------------------------------------------------
def start_metrics_server(registry, host: str, port: int, max_connections: int | None = None,
                         timeout: float | None = None) -> BoundedMetricsServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread; `.server_port` is the bound port.
    Idle and slow connections hold no thread and cannot crowd out scrapes (metrics_server.py)."""
    return _start(make_wsgi_app(registry), host, port,
                  METRICS_MAX_CONNECTIONS if max_connections is None else max_connections,
                  METRICS_CONNECTION_TIMEOUT_S if timeout is None else timeout)
