"""Greedy outputs of the engine equal `transformers` generate, token for token, in float64.

The engine runs 16 prompts together under a small token budget (chunked
prefill, several sequences per step); transformers runs each prompt alone.
"""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM

from tests.helpers.parity import assert_pool_free as _assert_pool_free
from tests.helpers.parity import check_prefix_cache_parity, engine_greedy, hf_greedy
from tests.helpers.parity import prompts as _prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow  # transformers generate beside the engine, in float64


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_parity_chunked_batched(tiny_model, name):
    path = tiny_model(name)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    prompts = _prompts(vocab, seed=len(name))
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16)
    got = engine_greedy(llm, prompts)
    want = hf_greedy(path, prompts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {w}"
    _assert_pool_free(llm)


@pytest.mark.parametrize("name", ["qwen3_e6k3", "mixtral_e5k3"])
def test_greedy_parity_under_preemption(tiny_model, name):
    path = tiny_model(name)
    vocab = TINY_CONFIGS[name]["vocab_size"]
    prompts = _prompts(vocab, seed=7, lo=20, hi=120)
    # 24 blocks of 8 tokens hold about two long prompts: eight running sequences must preempt.
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8)
    got = engine_greedy(llm, prompts, max_new=16)
    assert llm.engine.stats().num_preemptions_total > 0
    assert got == hf_greedy(path, prompts, max_new=16)
    _assert_pool_free(llm)


def test_prefix_caching_hits_and_parity(tiny_model):
    check_prefix_cache_parity(LLM, tiny_model("qwen3_e6k3"), vocab=512, n=6, max_suffix=30)
