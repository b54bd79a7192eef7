"""Expert parallelism on Ray (CPU, gloo) for gpt-oss: each rank reads only its experts' rows (and biases) of
the fused, transposed, interleaved expert tensors; greedy outputs equal transformers' in float64 at EP 2
(5 experts: 3 / 2)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from tests.helpers.gpt_oss_checkpoints import VOCAB, save_gpt_oss
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


# 3 layers: one block table for all; 4: sliding and full layers paired on shared tensors, the sliding group on
# its own table (scheduler/sliding_kv.py), on each rank.
@pytest.mark.parametrize("layers", [3, 4])
def test_ep2_matches_transformers(local_ray, tmp_path, layers):
    path = save_gpt_oss(tmp_path, num_hidden_layers=layers)
    ps = prompts(VOCAB, seed=11, n=4, lo=1, hi=30)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=16,
              num_kv_blocks=64, block_size=4)
    try:
        assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
