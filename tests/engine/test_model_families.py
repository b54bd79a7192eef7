"""DeepSeek-V3, DeepSeek-V2 and GLM-4-MoE checkpoints saved by transformers: the engine's
greedy outputs equal transformers' `generate` on each prompt alone, token for token, in float64.

16 prompts of 1-200 tokens run together under a small token budget (chunked prefill, several sequences per
step), then again under a KV pool small enough to preempt (asserted), and prompts sharing a prefix hit the
prefix cache (asserted). The checkpoints are tests.helpers.hf_checkpoints.HF_TINY.
"""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM

from tests.helpers.hf_checkpoints import HF_TINY, VOCAB
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow  # transformers generate beside the engine, in float64

# One checkpoint per architecture for the preemption and prefix-cache runs.
ONE_PER_ARCH = ["dsv3_lora", "dsv2_lite", "glm_bias"]


def _prompts(name: str) -> list[list[int]]:
    return prompts(VOCAB, seed=len(name) + sum(map(ord, name)))


@pytest.mark.parametrize("name", list(HF_TINY))
def test_greedy_parity_chunked_batched(hf_tiny_model, name):
    path = hf_tiny_model(name)
    ps = _prompts(name)
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.parametrize("name", ONE_PER_ARCH)
def test_greedy_parity_under_preemption(hf_tiny_model, name):
    path = hf_tiny_model(name)
    ps = _prompts(name)  # the chunked test's prompts: transformers' outputs are cached
    # 32 blocks of 8 tokens hold one 200-token prompt and a little more: eight running sequences must preempt.
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=32, block_size=8)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.parametrize("name", ONE_PER_ARCH)
def test_prefix_cache_hits_and_parity(hf_tiny_model, name):
    path = hf_tiny_model(name)
    rng = random.Random(3)
    prefix = [rng.randrange(VOCAB) for _ in range(64)]
    ps = [prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=128, num_kv_blocks=128, block_size=16)
    first = engine_greedy(llm, ps[:1])
    hits_before = llm.engine.stats().prefix_cache_hits
    rest = engine_greedy(llm, ps[1:])
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    assert hits >= 64 * 5, f"expected the 64-token prefix to hit for 5 prompts, got {hits} hit tokens"
    assert_same(first + rest, hf_greedy(path, ps), ps)
    assert_pool_free(llm)
