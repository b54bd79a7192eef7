"""vLLM 0.32's Prometheus series, for dashboards and alerts written for `vllm serve`.

vLLM's names, labels and histogram buckets (vllm/v1/metrics/loggers.py, PrometheusStatLogger, and buckets.py), each
series labelled `model_name` (the first served name) and `engine` ("0": one engine per server here; vLLM counts its
data-parallel engines). The numbers are moelink's own, measured where moelink measures a request's timing: the
output thread's `EngineMetrics.on_outputs` (engine/core/metrics.py) calls `first_token`, `token_gaps` and
`finished` as each request's outputs come, and the server's request loop (engine/server/serving.py) calls
`request_params` when a request's samples are done (vLLM records `n`, `max_tokens` and the most tokens a sample
generated once per request, as here). Engine-level gauges and counters are read from the engine at scrape time.

The phase times and preemptions of a request come from its last output's `RequestOutput.metrics` (the scheduler's
`scheduled_time` and `num_preemptions`: `phases`); `iteration_tokens_total` from the engine loop's counts
(engine/core/loop_stats.py), read at scrape time. Not exported (no same number here; docs/vllm-compat.md#metrics
lists each with its reason): the prompt tokens by source and cached tokens by tier (the split is not recorded per
request), `lora_requests_info`, and the series vLLM makes only with a flag moelink refuses (the MFU estimates,
KV-block residency, the KV connector's NIXL series).
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .loop_stats import ITERATION_TOKENS_BUCKETS

# vllm/v1/metrics/buckets.py (vLLM 0.32), family by family.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# vLLM's finish reasons (vllm.v1.engine.FinishReason): every label made at start, as vLLM makes them.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
WAITING_REASONS = ("capacity", "deferred")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
LABELS = ("model_name", "engine")


def request_tokens_buckets(max_model_len: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_model_len (build_1_2_5_buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > max_model_len:
                return out
            out.append(value)
        exponent += 1


class VllmMetrics:
    """vLLM's series of one engine, on `registry` (an EngineMetrics'); `engine` (an LLMEngine) is read at scrape time."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int, engine=None):
        self.model_name, self.engine = model_name, engine
        self.values = (model_name, "0")
        tokens = request_tokens_buckets(max_model_len)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry).labels(*self.values)

        def count(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(*self.values)

        self.prompt_tokens = count("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_tokens_cached = count("vllm:prompt_tokens_cached",
                                          "Number of cached prompt tokens (local + external).")
        self.generation_tokens = count("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          LABELS + ("finished_reason",), registry=registry)
        self.success = {r: success.labels(*self.values, r) for r in FINISH_REASONS}
        self.req_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.req_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", tokens)
        self.max_generation = hist("vllm:request_max_num_generation_tokens",
                                   "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.",
                             REQUEST_PARAMS_N_BUCKETS)
        self.params_max_tokens = hist("vllm:request_params_max_tokens",
                                      "Histogram of the max_tokens request parameter.", tokens)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                          REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.preemptions = hist("vllm:request_num_preemptions",
                                "Histogram of the number of times a request was preempted.",
                                REQUEST_NUM_PREEMPTIONS_BUCKETS)
        self.prefill_kv = hist("vllm:request_prefill_kv_computed_tokens",
                               "Histogram of new KV tokens computed during prefill (excluding cached tokens).", tokens)
        rejections = Counter("vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, "
                             "by reason.", ("model_name", "reason"), registry=registry)
        self.rejections = {r: rejections.labels(model_name, r) for r in ADMISSION_REASONS}
        registry.register(_EngineSeries(self))

    # -- per request, from the output thread (EngineMetrics.on_outputs) and the server --------------------------
    def first_token(self, ttft_s: float, cached_tokens: int) -> None:
        """A request's first token came `ttft_s` after its arrival; `cached_tokens` of its prompt were not computed."""
        self.ttft.observe(ttft_s)
        self.prompt_tokens_cached.inc(cached_tokens)

    def token_gaps(self, gap_s: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(gap_s)

    def generated(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def finished(self, reason: Optional[str], prompt_tokens: int, cached_tokens: int, generated: int, e2e_s: float,
                 decode_s: float) -> None:
        """A request (one sample) ended: `decode_s` from its first token to its last."""
        self.success.get(reason or "", self.success["abort"]).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.req_prompt.observe(prompt_tokens)
        self.req_generation.observe(generated)
        self.prefill_kv.observe(prompt_tokens - max(cached_tokens, 0))
        self.e2e.observe(e2e_s)
        self.decode.observe(decode_s)
        # vLLM's mean time per output token leaves the first (the prefill's) out
        self.tpot.observe(decode_s / (generated - 1) if generated > 1 else 0.0)

    def phases(self, queue_s: float, prefill_s: Optional[float], inference_s: float, preemptions: int) -> None:
        """A request that the scheduler ended (its last output carried the scheduler's timing): its wait before a
        step first computed it, from then to its first token, from then to its end, and its preemptions."""
        self.queue.observe(max(queue_s, 0.0))
        if prefill_s is not None:
            self.prefill.observe(max(prefill_s, 0.0))
        self.inference.observe(max(inference_s, 0.0))
        self.preemptions.observe(preemptions)

    def request_params(self, n: int, max_tokens: Optional[int], max_generated: int) -> None:
        """A request's samples are done: its `n`, its `max_tokens` and the most tokens one sample generated."""
        self.params_n.observe(n)
        self.max_generation.observe(max_generated)
        if max_tokens:
            self.params_max_tokens.observe(max_tokens)

    def rejected(self, reason: str) -> None:
        """An admission refused by a queue limit (`reason`: ADMISSION_REASONS)."""
        self.rejections[reason].inc()


class _EngineSeries:
    """vLLM's engine-level series, read from the engine at scrape time (read-only)."""

    def __init__(self, m: VllmMetrics):
        self.m = m

    def collect(self):
        eng = self.m.engine
        if eng is None:
            return
        st = eng.stats()
        values = list(self.m.values)

        def family(kind, name: str, doc: str, value, extra: tuple = (), extra_values: tuple = ()):
            f = kind(name, doc, labels=list(LABELS + extra))
            f.add_metric(values + list(extra_values), value)
            return f

        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution "
                     "batches.", st.num_running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     st.num_waiting)
        # Every waiting request here waits for capacity (KV blocks or the token budget); none is deferred.
        waiting = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Number of waiting requests by reason.",
                                    labels=list(LABELS + ("reason",)))
        waiting.add_metric(values + ["capacity"], st.num_waiting)
        waiting.add_metric(values + ["deferred"], 0)
        yield waiting
        # The tokens each step computed (prompt and generated), counted by the engine loop (LLMEngine.loop_stats).
        counts, total = eng.loop_stats.step_tokens_counts, eng.loop_stats.step_tokens_sum
        cumulative, running = [], 0
        for bound, c in zip((*ITERATION_TOKENS_BUCKETS, float("inf")), counts):
            running += c
            cumulative.append(("+Inf" if bound == float("inf") else str(float(bound)), running))
        steps = HistogramMetricFamily("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                      labels=list(LABELS))
        steps.add_metric(values, cumulative, total)
        yield steps
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     st.kv_usage)
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                     "queried tokens.", st.prefix_cache_queries)
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                     "tokens.", st.prefix_cache_hits)
        loaded = getattr(st.kv_transfer, "tokens_loaded", 0) if st.kv_transfer is not None else 0
        # A decode server's prompt KV loaded from its prefill server (0 elsewhere); the queries are counted as the
        # tokens loaded: a load that failed (recomputed here) is in neither.
        yield family(CounterMetricFamily, "vllm:external_prefix_cache_queries", "External prefix cache queries "
                     "from KV connector cross-instance cache sharing, in terms of number of queried tokens.", loaded)
        yield family(CounterMetricFamily, "vllm:external_prefix_cache_hits", "External prefix cache hits from KV "
                     "connector cross-instance cache sharing, in terms of number of cached tokens.", loaded)
        mm = eng.mm_stats if getattr(eng, "multimodal", None) is not None else None
        hits = mm.encoder_cache_hits if mm is not None else 0
        yield family(CounterMetricFamily, "vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number "
                     "of queried items.", hits + (mm.images_encoded if mm is not None else 0))
        yield family(CounterMetricFamily, "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of "
                     "cached items.", hits)
        yield family(CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                     st.num_preemptions_total)
        yield self._sleep(eng, values)
        yield self._cache_info(eng, st)

    @staticmethod
    def _sleep(eng, values: list):
        rl = getattr(eng, "rl", None)
        level = getattr(getattr(rl, "memory", None), "sleep_level", 0)
        g = GaugeMetricFamily("vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; "
                              "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
                              "discard_all = 1 means sleep level 2.", labels=list(LABELS + ("sleep_state",)))
        for state, on in zip(SLEEP_STATES, (level == 0, level == 1, level == 2)):
            g.add_metric(values + [state], 1 if on else 0)
        return g

    @staticmethod
    def _cache_info(eng, st):
        """vLLM's cache_config_info: a gauge at 1 whose labels are the cache configuration (those moelink has)."""
        cfg = eng.config
        info = {"block_size": str(cfg.cache.block_size),
                "cache_dtype": "auto" if getattr(cfg.model, "kv_cache_dtype", None) is None else "fp8",
                "enable_prefix_caching": str(bool(getattr(cfg.cache, "enable_prefix_caching", True))),
                "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
                "num_gpu_blocks": str(st.num_total_blocks), "engine": "0"}
        g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              labels=list(info))
        g.add_metric(list(info.values()), 1)
        return g
