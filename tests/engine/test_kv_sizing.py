"""KV cache sized by the ranks after loading their weights (the GPU default), exercised on CPU."""
from __future__ import annotations

import dataclasses

from moelink.engine import EngineArgs, SamplingParams
from moelink.engine.llm_engine import LLMEngine


def _deferred_config(path, **kw):
    cfg = EngineArgs(model=path, dtype="float32", max_model_len=256, **kw).create_engine_config()
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, num_kv_blocks=None),
                               gpu_memory_utilization=0.01)


def test_workers_size_the_cache_and_schedulers_follow(tiny_model):
    engine = LLMEngine(_deferred_config(tiny_model("qwen3_e6k3")))
    runner = engine.executor.runner
    blocks = engine.config.cache.num_kv_blocks
    assert blocks is not None and blocks > 0
    assert runner.kv_caches[0][0].shape[0] == blocks + 1  # + the null block
    assert engine.stats().num_total_blocks == blocks
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    while engine.has_requests():
        outs = engine.step()
    assert outs == [] or outs[-1].finished
    assert engine.stats().num_free_blocks == blocks
