"""A state slot a finished sequence leaves is reused by the next one: a one-token first chunk must start from zeros.

A step of one token per sequence runs the decode kernels, which read the slot whatever it holds (no has_initial
flag); a one-token prompt after other requests on the same engine read the last owner's state and drifted from
transformers (engine/state/cache.StatePlan.fresh_decodes now zeroes those slots first)."""
from __future__ import annotations

from moelink.engine import LLM

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts


def test_one_token_prompts_on_reused_state_slots_equal_transformers(hf_tiny_model):
    path = hf_tiny_model("qwen3_next")
    warm = prompts(VOCAB, seed=48, n=3, lo=5, hi=20)
    ones = [[p[0]] for p in prompts(VOCAB, seed=49, n=3, lo=1, hi=2)]
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=48, block_size=4)
    engine_greedy(llm, warm, max_new=4)  # every slot now holds a finished sequence's state
    want = hf_greedy(path, ones, max_new=4)
    for p, w in zip(ones, want):  # alone: a pure one-token step, the decode kernels on a reused slot
        assert_same(engine_greedy(llm, [p], max_new=4), [w], [p])
    assert_same(engine_greedy(llm, ones, max_new=4), want, ones)  # together
    assert_pool_free(llm)
