"""DeepSeek-V4's MTP drafter (method "mtp") under expert parallelism on Ray (CPU, gloo), EP 2: each rank drafts for
its own sequences, and the MTP block's MoE dispatches like a main layer's on every rank in the same order (a rank
with no rows in a step its peer runs joins with empty batches). Greedy equals transformers in float64 with drafts
accepted and rejected (the bigram MTP of tests/helpers/dsv4_mtp_checkpoint.py); every block back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from tests.helpers.dsv4_checkpoint import VOCAB
from tests.helpers.dsv4_mtp_checkpoint import bigram_dsv4_mtp, save_dsv4_with_mtp
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


def test_dsv4_mtp_drafts_at_ep2_equal_transformers(local_ray, tmp_path_factory):
    d = tmp_path_factory.mktemp("dsv4_mtp_ep")
    path = bigram_dsv4_mtp(save_dsv4_with_mtp(d / "random", moe_intermediate_size=32), d / "bigram")[0]
    ps = prompts(VOCAB, seed=13, n=5, hi=120)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=96, block_size=8, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(path, ps, max_new=8), ps)
        sd = llm.engine.stats().spec_decode
        assert 0.3 < sd.acceptance_rate < 1.0, sd
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
