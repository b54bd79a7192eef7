"""KV cache sized by the ranks after loading their weights (the GPU default), exercised on CPU."""
from __future__ import annotations

import dataclasses

from moelink.engine import EngineArgs, SamplingParams
from moelink.engine.core.llm_engine import LLMEngine


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


def test_mla_cache_holds_the_latent_per_token(hf_tiny_model):
    """An MLA layer caches (kv_lora_rank + qk_rope_head_dim) values per token, not a K and a V per head, and a
    fixed KV memory budget admits the tokens that size gives."""
    import json
    from pathlib import Path

    from moelink.engine.config import kv_sizing

    path = hf_tiny_model("dsv3_lora")
    raw = json.loads((Path(path) / "config.json").read_text())
    latent = raw["kv_lora_rank"] + raw["qk_rope_head_dim"]
    for dtype, elem in (("float32", 4), ("bfloat16", 2), ("float64", 8)):
        m = EngineArgs(model=path, dtype=dtype, max_model_len=256, num_kv_blocks=4).create_engine_config().model
        assert kv_sizing.kv_cache_bytes_per_token_per_layer(m) == latent * elem
        assert kv_sizing.kv_cache_bytes_per_block(m, 16) == latent * elem * 16 * raw["num_hidden_layers"]
    # 10 blocks of 16 tokens and not quite an 11th: the driver admits 160 tokens; the runner allocates one
    # [10 + 1 null, 16, latent] tensor per layer, and that is all the cache there is.
    per_block = kv_sizing.kv_cache_bytes_per_block(m, 16)
    cfg = EngineArgs(model=path, dtype="float64", max_model_len=256, block_size=16,
                     kv_cache_memory_bytes=11 * per_block - 1).create_engine_config()
    assert cfg.cache.num_kv_blocks == 10
    engine = LLMEngine(cfg)
    caches = engine.executor.runner.kv_caches
    assert len(caches) == raw["num_hidden_layers"]
    assert all(len(layer) == 1 and tuple(layer[0].shape) == (11, 16, latent) for layer in caches)
    assert sum(t.numel() * t.element_size() for layer in caches for t in layer) == 11 * per_block
    assert engine.stats().num_total_blocks * 16 == 160
