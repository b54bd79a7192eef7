"""An update with flush_cache=False (SGLang's field; slime and verl send it, and flush on their own): the update answers
without flushing the prefix cache, and no request ever reads a prefix cached under the old weights: the caller's own
flush, or else the first request admitted (or continue_generation) after the update, flushes it
(engine/rl/control.py: RLControl._flush_after_update)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

PROMPT = [5, 17, 42, 8, 99, 3, 61, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]


def test_update_without_flush_defers_it_to_the_next_admission(tiny_model):
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, enable_weight_updates=True, max_num_seqs=2, num_kv_blocks=64, block_size=4)
    rl = llm.engine.rl
    flushes = []
    real = rl.flush_cache
    rl.flush_cache = lambda: flushes.append(1) or real()
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    first = llm.generate([{"prompt_token_ids": PROMPT}], greedy)[0].outputs[0].token_ids
    llm.update_weights_from_disk(path, flush_cache=False)
    assert rl._cache_stale and not flushes  # not flushed by the update
    again = llm.generate([{"prompt_token_ids": PROMPT}], greedy)[0].outputs[0].token_ids
    assert not rl._cache_stale and len(flushes) == 1 and again == first  # flushed at admission
    llm.update_weights_from_disk(path, flush_cache=False)
    assert rl._cache_stale
    llm.flush_cache()  # the caller's own flush (slime's GET /flush_cache) clears it
    assert not rl._cache_stale
    llm.update_weights_from_disk(path)  # the default flushes at once
    assert not rl._cache_stale
