"""Expert parallelism on Ray (CPU, gloo) for a hybrid model (issue 42): Qwen3-Next's gated DeltaNet layers keep their
per-sequence state on the rank that runs the sequence (data-parallel attention), its MoE layers dispatch as any
family's. Greedy outputs equal transformers' in float64 at EP 2 (6 experts, 3/3), every routed (token, expert) pair
counted once, every state slot and KV block back when the requests end."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig

from tests.helpers.hf_checkpoints import VOCAB, hf_config
from tests.helpers.parity import MAX_NEW, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


def test_qwen3_next_ep2_matches_transformers(local_ray, hf_tiny_model):
    path = hf_tiny_model("qwen3_next")
    ps = prompts(VOCAB, seed=5, n=8, hi=150)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=16)
    try:
        assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
        cfg = hf_config("qwen3_next")
        moe_layers = len(ModelConfig.from_pretrained(path).sparse_layers)
        computed = sum(len(p) + MAX_NEW - 1 for p in ps)
        m = llm.engine.moe_metrics
        assert m.total_routed() == computed * cfg.num_experts_per_tok * moe_layers
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
