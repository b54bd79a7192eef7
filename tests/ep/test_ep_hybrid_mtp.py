"""Qwen3-Next's MTP drafts under expert parallelism (EP 2 on Ray): every rank runs the MTP module's k forwards per
step (its MoE dispatching like a main layer's; only its collectives on a rank without rows), each rank's verify
steps roll its own sequences' linear-attention states back past rejected drafts, and the greedy outputs equal
transformers' in float64."""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.qwen_mtp_checkpoints import bigram_mtp, with_mtp

pytestmark = pytest.mark.slow


def test_qwen3_next_mtp_drafts_at_ep2_match_transformers(local_ray, hf_tiny_model, tmp_path):
    path = str(bigram_mtp(with_mtp(hf_tiny_model("qwen3_next"), tmp_path / "random"), tmp_path / "bigram"))
    ps = prompts(VOCAB, seed=13, n=6, lo=2, hi=60)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=96, block_size=8, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
        per_rank = [s.spec_decode for s in llm.engine.rank_stats()]
        assert sum(sd.num_accepted_tokens for sd in per_rank) > 0
        assert sum(sd.num_draft_tokens - sd.num_accepted_tokens for sd in per_rank) > 0  # rejections too
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
