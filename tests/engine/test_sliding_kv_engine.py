"""gpt-oss's sliding-window layers on their own block table (scheduler/sliding_kv.py, the runner's paired cache
tensors): a long decode gives sliding blocks back while it runs and still equals transformers token for token
(float64), as do preemption and a prefix-cache hit; nothing leaks; the same memory admits more KV blocks.
Models whose sliding and full layers are not equally many (the 3-layer checkpoint of test_gpt_oss.py) and
models without sliding layers keep one table for every layer.

A 2-layer checkpoint: layer 0 slides (window 6), layer 1 attends to everything; they share one cache tensor set.
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.kv_sizing import driver_num_kv_blocks, kv_cache_bytes_per_block, kv_sliding_window
from moelink.scheduler.sliding_kv import NULL_BLOCK

from tests.helpers.gpt_oss_checkpoints import VOCAB, WINDOW, gpt_oss_config, save_gpt_oss
from tests.helpers.parity import (assert_pool_free, assert_same, check_prefix_cache_parity, engine_greedy,
                                  hf_greedy, prompts)


@pytest.fixture(scope="module")
def paired_path(tmp_path_factory):
    return save_gpt_oss(tmp_path_factory.mktemp("gpt_oss_paired"), num_hidden_layers=2)


def _free_blocks_per_step(llm):
    """Record the pool's free blocks after each step, and check the worker's sliding tables against the
    scheduler's: the same ids, the null block where the scheduler freed one (it never addresses a freed id)."""
    seen, nulled = [], []
    real = llm.engine.step
    runner, sched = llm.engine.executor.worker.runner, llm.engine.schedulers[0]

    def step():
        out = real()
        if llm.engine.has_unfinished_requests():
            seen.append(llm.engine.stats().num_free_blocks)
        for rid, st in runner.requests.items():
            if rid not in sched.requests:
                continue
            want = [runner.null_block if b == NULL_BLOCK else b for b in sched.kv.get_sliding_block_ids(rid)]
            assert st.sliding.arr[: st.sliding.n].tolist() == want
            nulled.append(st.sliding.num_nulled)
        return out

    nulled = []

    llm.engine.step = step
    return seen, nulled


def test_long_decode_frees_sliding_blocks_and_equals_transformers(paired_path):
    cfg = ModelConfig.from_pretrained(paired_path, dtype="float64")
    assert cfg.attention.kv_layer_pairs(2) == ((1, 0),) and kv_sliding_window(cfg) == WINDOW
    ps = [prompts(VOCAB, seed=11, n=2, lo=9, hi=9)[0]]
    llm = LLM(paired_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=8, num_kv_blocks=64,
              block_size=2)
    runner = llm.engine.executor.worker.runner
    assert runner.kv_caches[0] is runner.kv_caches[1]  # one tensor set for the pair
    free, nulled = _free_blocks_per_step(llm)
    got = engine_greedy(llm, ps, max_new=30)
    # Each step of a decode takes a full block every other token; the sliding table gives its oldest back at
    # the same pace once the window has moved on, so the free count rises again between takes.
    assert any(b > a for a, b in zip(free, free[1:])), f"no step gave sliding blocks back: {free}"
    assert max(nulled) >= 10  # the worker's table nulled what the scheduler freed
    # 39 tokens: 20 full blocks; a table per group that kept everything would hold 40.
    assert min(free) >= 64 - 20 - (-(-(8 + WINDOW) // 2) + 2), free
    assert_same(got, hf_greedy(paired_path, ps, max_new=30), ps)
    assert_pool_free(llm)
    llm.engine.schedulers[0].check_invariants()


def test_preemption_stays_exact(paired_path):
    ps = prompts(VOCAB, seed=7, n=5, lo=1, hi=30)
    # 20 blocks of 4: five sequences of up to 30 + 10 tokens preempt each other.
    llm = LLM(paired_path, dtype="float64", max_num_seqs=5, max_num_batched_tokens=16, num_kv_blocks=20,
              block_size=4)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(paired_path, ps), ps)
    assert_pool_free(llm)


def test_a_prefix_hit_stays_exact(paired_path):
    # A 64-token shared prefix (10x the window): hits need the sliding group's window blocks cached too.
    check_prefix_cache_parity(LLM, paired_path, VOCAB, n=3, max_suffix=5)


def test_a_prompt_longer_than_one_sequence_may_hold_is_refused(paired_path):
    # 20 blocks of 4, chunks of 16, window 6: a step's sliding blocks are at most ceil(22 / 4) + 2 = 8, so one
    # sequence may hold 12 full blocks (48 tokens), not 80.
    llm = LLM(paired_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=20,
              block_size=4)
    assert llm.engine.schedulers[0].pool_tokens == 48
    with pytest.raises(ValueError, match=r"prompt_token_ids has 60 tokens, more than the KV cache holds \(20 blocks of 4 "
                                         r"tokens, of which one sequence may use 48 tokens"):
        llm.generate([[1] * 60], use_tqdm=False)
    assert engine_greedy(llm, [[1] * 40], max_new=2)  # 40 + 1 fit
    assert_pool_free(llm)


def test_the_same_memory_holds_more_blocks(tmp_path):
    paired = ModelConfig.from_pretrained(_config(tmp_path / "p", num_hidden_layers=4))
    full = ModelConfig.from_pretrained(_config(tmp_path / "f", num_hidden_layers=4, layer_types=["full_attention"] * 4))
    odd = ModelConfig.from_pretrained(_config(tmp_path / "o", num_hidden_layers=3))
    budget = 1 << 20
    blocks = {name: driver_num_kv_blocks(c, 16, None, budget, "cuda", 8)
              for name, c in (("paired", paired), ("full", full), ("odd", odd))}
    assert blocks["paired"] == 2 * blocks["full"]
    assert kv_cache_bytes_per_block(paired, 16) * 2 == kv_cache_bytes_per_block(full, 16)
    # 2 sliding + 1 full cannot pair: one table, a tensor set per layer, as before.
    assert odd.attention.kv_layer_pairs(3) is None and kv_sliding_window(odd) is None
    assert kv_cache_bytes_per_block(odd, 16) == 3 * 16 * odd.attention.kv_bytes_per_token(odd.cache_dtype)
    assert kv_sliding_window(full) is None


def test_unpaired_layouts_keep_one_table(tmp_path):
    path = save_gpt_oss(tmp_path, num_hidden_layers=3)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=8, num_kv_blocks=16, block_size=4)
    assert llm.engine.config.cache.sliding_window is None
    runner = llm.engine.executor.worker.runner
    assert runner.kv_pairs is None and len({id(c) for c in runner.kv_caches}) == 3


def _config(path, **overrides) -> str:
    gpt_oss_config(**overrides).save_pretrained(path)
    return str(path)
