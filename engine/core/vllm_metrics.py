"""vLLM's Prometheus names beside moelink's own, for dashboards and alerts written for `vllm serve`.

Each alias is the same number as a moelink series (never a second count kept apart): engine-level gauges and
counters are read from the engine at scrape time, the request histograms are moelink's, renamed. Every series
carries vLLM's `model_name` label (Grafana's vLLM dashboard filters on it). Only where the meaning is the same:
vLLM's `vllm:gpu_cache_usage_perc` / `vllm:kv_cache_usage_perc` are a fraction (1 = full), as moelink's
`moelink_kv_cache_usage_ratio`; vLLM's `vllm:inter_token_latency_seconds` is the gap between a request's tokens,
as `moelink_inter_token_latency_seconds`.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

# vLLM histogram name -> the moelink histogram (EngineMetrics attribute) that counts the same thing.
HISTOGRAMS = {"vllm:time_to_first_token_seconds": "ttft", "vllm:e2e_request_latency_seconds": "e2e",
              "vllm:inter_token_latency_seconds": "itl"}


class VllmAliasCollector:
    """vLLM's names for `metrics` (an EngineMetrics), labelled model_name=`model_name`; register it on
    `metrics.registry`."""

    def __init__(self, metrics, model_name: str):
        self.m = metrics
        self.model_name = model_name

    def collect(self):
        label = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=label)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=label)
            c.add_metric(value, v)
            return c

        yield counter("vllm:prompt_tokens", "Prompt tokens of finished requests (= moelink_prompt_tokens_total).",
                      _total(self.m.prompt_tokens))
        yield counter("vllm:generation_tokens", "Generated tokens (= moelink_generation_tokens_total).",
                      _total(self.m.generation_tokens))
        success = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason "
                                      "(= moelink_requests_total).", labels=["model_name", "finished_reason"])
        for sample in _samples(self.m.requests):
            if sample.name.endswith("_total"):
                success.add_metric([self.model_name, sample.labels["outcome"]], sample.value)
        yield success
        for name, attr in HISTOGRAMS.items():
            yield _renamed(getattr(self.m, attr), name, self.model_name)
        eng = self.m.engine
        if eng is None:
            return
        st = eng.stats()
        yield gauge("vllm:num_requests_running", "Requests scheduled on the ranks.", st.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for KV blocks or budget.", st.num_waiting)
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            yield gauge(name, "KV-cache usage as a fraction, 1 = full (= moelink_kv_cache_usage_ratio).", st.kv_usage)
        yield counter("vllm:num_preemptions", "Requests preempted (= moelink_num_preemptions_total).",
                      st.num_preemptions_total)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      st.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", st.prefix_cache_hits)


def _samples(metric):
    return [s for family in metric.collect() for s in family.samples]


def _total(counter) -> float:
    return next(s.value for s in _samples(counter) if s.name.endswith("_total"))


def _renamed(histogram, name: str, model_name: str) -> Metric:
    """A moelink histogram's samples under vLLM's name, with the model_name label."""
    family = next(iter(histogram.collect()))
    out = Metric(name, family.documentation, "histogram")
    for s in family.samples:
        if s.name.endswith("_created"):
            continue
        out.add_sample(name + s.name[len(family.name):], {"model_name": model_name, **s.labels}, s.value)
    return out
