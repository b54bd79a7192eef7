"""Expert parallelism on Ray (CPU, gloo) for MiniMax-M2 and MiMo-V2-Flash: greedy outputs equal transformers'
generate token for token in float64 at EP 2 (MiniMax's 6 experts 3/3 with the correction bias beside the router;
MiMo's 8 experts 4/4, grouped routing, a dense first layer, sliding and full layers of their own shapes), every
routed (token, expert) pair counted once over the MoE layers only."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig

from tests.helpers.m2_checkpoints import VOCAB, m2_config, save_m2_checkpoint
from tests.helpers.parity import MAX_NEW, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["minimax", "mimo"])
def test_ep2_matches_transformers(local_ray, tmp_path, name):
    path = save_m2_checkpoint(tmp_path, name)
    ps = prompts(VOCAB, seed=2 + len(name), n=8, hi=150)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=16)
    try:
        got = engine_greedy(llm, ps)
        assert_same(got, hf_greedy(path, ps), ps)
        cfg = m2_config(name)
        moe_layers, experts = len(ModelConfig.from_pretrained(path).sparse_layers), cfg.num_local_experts
        assert moe_layers == cfg.num_hidden_layers - (name == "mimo")  # MiMo's first layer is dense
        computed = sum(len(p) + MAX_NEW - 1 for p in ps)
        m = llm.engine.moe_metrics
        assert m.total_routed() == computed * cfg.num_experts_per_tok * moe_layers
        assert m.tokens_per_expert.shape == (moe_layers, experts)
        assert m.bytes_dispatched > 0 and m.bytes_dispatched == m.bytes_combined
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
