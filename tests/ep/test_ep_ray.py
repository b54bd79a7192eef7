"""Expert parallelism on Ray (CPU, gloo): same greedy tokens as one rank; dead ranks fail fast."""
from __future__ import annotations

import asyncio
import time

import pytest

from moelink.engine import AsyncEngine, EngineArgs, SamplingParams

from tests.helpers import ep_runs
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow


def _assert_counters(name, prompts, total_routed, bytes_dispatched, bytes_combined):
    # Every routed (token, expert) pair is counted once: tokens × top-k × MoE layers.
    cfg = TINY_CONFIGS[name]
    computed = sum(len(p) + ep_runs.MAX_NEW - 1 for p in prompts)
    assert total_routed == computed * cfg["top_k"] * cfg["num_layers"]
    assert bytes_dispatched > 0 and bytes_dispatched == bytes_combined


# Mixtral at EP 4 only (5 experts over 4 ranks: an uneven split; its EP 2 adds nothing Qwen3's EP 2 does not check).
# Qwen3 at EP 2 is checked the same way on test_ep_ranks_size_the_kv_cache_together's engine (one engine fewer:
# the ranks sizing the KV cache changes only how many blocks each has). The prompts (6 of 1-100 tokens: prefills
# chunked under the 48-token budget, ragged batches), one rank's tokens and each EP run come from
# tests/helpers/ep_runs.py, made once per process: Qwen3's EP 4 run is also test_ep_two_level.py's dispatch-byte
# reference.
@pytest.mark.parametrize("name,ep", [("qwen3_e6k3", 4), ("mixtral_e5k3", 4)])
def test_ep_matches_single_rank(local_ray, tiny_model, name, ep):
    path, vocab = tiny_model(name), TINY_CONFIGS[name]["vocab_size"]
    prompts, want = ep_runs.one_rank(path, vocab)
    run = ep_runs.ep_run(path, vocab, ep)
    assert run.tokens == want
    _assert_counters(name, prompts, run.total_routed, run.bytes_dispatched, run.bytes_combined)
    # Requests were spread over the ranks (DP attention), and every pool is free again.
    assert run.pools_free


def test_dead_rank_fails_inflight_requests_fast(local_ray, tiny_model):
    import ray

    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32",
                                                     expert_parallel_size=2, num_kv_blocks=64, max_num_seqs=8))

    async def one(i, streaming: asyncio.Event):
        params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)  # up to the context: long
        n = 0
        try:
            async for _ in engine.generate(f"r{i}", [i + 1] * 20, params):
                n += 1
                streaming.set()
        except Exception as exc:  # the engine dies under it
            return n, exc
        return n, None

    async def main():
        streaming = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.create_task(one(i, streaming[i])) for i in range(4)]
        # Every request runs and has streamed a token (the kill comes mid-stream).
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), timeout=60)
        except asyncio.TimeoutError:
            raise AssertionError(f"not every request streamed within 60 s: {[e.is_set() for e in streaming]}") from None
        t0 = time.monotonic()
        ray.kill(engine.engine.executor.workers[1], no_restart=True)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        return results, time.monotonic() - t0

    try:
        results, elapsed = asyncio.run(main())
        assert elapsed < 30
        for n, exc in results:
            assert n > 0 and exc is not None and "rank 1" in str(exc), (n, exc)
        assert not engine.is_healthy
    finally:
        engine.shutdown()


def test_ep_padded_all_to_all_backend_matches(local_ray, tiny_model):
    """The fixed-buffer (CUDA-graph-safe) dispatch gives the same tokens as the counted one."""
    path, vocab = tiny_model("qwen3_e6k3"), TINY_CONFIGS["qwen3_e6k3"]["vocab_size"]
    _, want = ep_runs.one_rank(path, vocab)
    run = ep_runs.ep_run(path, vocab, 2, all_to_all="torch_padded")
    assert run.tokens == want and run.pools_free


def test_ep_ranks_size_the_kv_cache_together(local_ray, tiny_model):
    """Deferred KV sizing (the GPU default): every rank measures, all get the smallest count. Also Qwen3's EP 2
    parity with one rank (test_ep_matches_single_rank's checks: tokens, counters, free pools) on the default
    all-to-all, with test_ep_matches_single_rank's scheduler settings."""
    import dataclasses

    from moelink.engine.core.llm_engine import LLMEngine

    path = tiny_model("qwen3_e6k3")
    cfg = EngineArgs(model=path, max_model_len=256, expert_parallel_size=2, **ep_runs.ENGINE_KW).create_engine_config()
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, num_kv_blocks=None), gpu_memory_utilization=0.01)
    engine = LLMEngine(cfg)
    try:
        blocks = engine.config.cache.num_kv_blocks
        assert blocks > 0 and all(s.num_total_blocks == blocks for s in engine.rank_stats())
        prompts, want = ep_runs.one_rank(path, TINY_CONFIGS["qwen3_e6k3"]["vocab_size"])
        params = SamplingParams(temperature=0.0, max_tokens=ep_runs.MAX_NEW, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"k{i}", p, params)
        done = {}
        while engine.has_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert [done[f"k{i}"] for i in range(len(prompts))] == want
        m = engine.moe_metrics
        _assert_counters("qwen3_e6k3", prompts, m.total_routed(), m.bytes_dispatched, m.bytes_combined)
        assert all(s.num_free_blocks == s.num_total_blocks for s in engine.rank_stats())
    finally:
        engine.shutdown()
