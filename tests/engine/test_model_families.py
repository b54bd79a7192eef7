"""DeepSeek-V3, DeepSeek-V2 and GLM-4-MoE checkpoints saved by transformers: the engine's
greedy outputs equal transformers' `generate` on each prompt alone, token for token, in float64.

16 prompts of 1-200 tokens run together under a small token budget (chunked prefill, several sequences per
step), then again under a KV pool small enough to preempt (asserted), and a second time on the chunked run's
engine, where the prompts hit the prefix cache (asserted), for every checkpoint. MAX_NEW (5) new tokens a prompt:
past the prefill every step is a decode step of the batch, and the small pool still preempts. The checkpoints
are tests.helpers.hf_checkpoints.HF_TINY.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from tests.helpers.hf_checkpoints import HF_TINY, VOCAB
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("heap_held_frozen")]  # transformers generate beside the engine, in float64

MAX_NEW = 5


def _prompts(name: str) -> list[list[int]]:
    return prompts(VOCAB, seed=len(name) + sum(map(ord, name)))


@pytest.fixture(scope="module")
def chunked(hf_tiny_model):
    """chunked(name) → (path, prompts, the chunked engine, its first run's outputs), made once per checkpoint:
    the prefix-cache test runs the same prompts again on that engine."""
    runs: dict = {}

    def get(name: str):
        if name not in runs:
            path = hf_tiny_model(name)
            ps = _prompts(name)
            llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256,
                      block_size=16)
            runs[name] = (path, ps, llm, engine_greedy(llm, ps, MAX_NEW))
        return runs[name]

    yield get
    for _, _, llm, _ in runs.values():
        llm.shutdown()


@pytest.mark.parametrize("name", list(HF_TINY))
def test_greedy_parity_chunked_batched(chunked, name):
    path, ps, llm, got = chunked(name)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(path, ps, MAX_NEW), ps)
    assert_pool_free(llm)


@pytest.mark.parametrize("name", list(HF_TINY))
def test_greedy_parity_under_preemption(hf_tiny_model, name):
    path = hf_tiny_model(name)
    ps = _prompts(name)  # the chunked test's prompts: transformers' outputs are cached
    # 32 blocks of 8 tokens hold one 200-token prompt and a little more: eight running sequences must preempt.
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=32, block_size=8)
    got = engine_greedy(llm, ps, MAX_NEW)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(path, ps, MAX_NEW), ps)
    assert_pool_free(llm)


@pytest.mark.parametrize("name", list(HF_TINY))
def test_prefix_cache_hits_and_parity(chunked, name):
    """The chunked test's 16 prompts (1-200 tokens; transformers' outputs are cached) run again on the engine that
    ran them there: this time every full block of every prompt comes from the prefix cache (asserted), and the
    outputs still equal transformers'."""
    path, ps, llm, first = chunked(name)
    want = hf_greedy(path, ps, MAX_NEW)
    assert_same(first, want, ps)
    hits_before = llm.engine.stats().prefix_cache_hits
    again = engine_greedy(llm, ps, MAX_NEW)
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    # A prompt's last token is always computed, so its cached part is its full blocks before that token.
    full_blocks = sum((len(p) - 1) // 16 * 16 for p in ps)
    assert hits >= full_blocks > 0, f"expected >= {full_blocks} prefix-cache hit tokens, got {hits}"
    assert_same(again, want, ps)
    assert_pool_free(llm)
