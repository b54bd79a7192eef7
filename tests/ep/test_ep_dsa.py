"""Expert parallelism on Ray (CPU, gloo) for DeepSeek Sparse Attention (issue 43): DeepSeek-V3.2 (12 experts, 6/6) and
GLM-5 (10 experts, 5/5, a shared-selection layer) at EP 2. Attention is data parallel, so each rank's indexer selects
over its own sequences' keys; the MoE dispatch is DeepSeek-V3's. Greedy outputs equal transformers' forward without a
cache in float64 (prompts of 1-150 tokens past index_topk), every routed pair counted once, every block back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig

from tests.helpers.hf_checkpoints import VOCAB, hf_config
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.slow

# 5 prompts (the 1- and 150-token ones always: past index_topk, prefills chunked under the 48-token budget), 6 new
# tokens each: transformers' oracle here reruns its whole forward for every new token.
N_PROMPTS, NEW = 5, 6


@pytest.mark.parametrize("name", ["dsv32", "glm5"])
def test_dsa_ep2_matches_transformers(local_ray, hf_tiny_model, name):
    path = hf_tiny_model(name)
    ps = prompts(VOCAB, seed=9 + len(name), n=N_PROMPTS, hi=150)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=16)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy_nocache(path, ps, max_new=NEW), ps)
        moe_layers = len(ModelConfig.from_pretrained(path).sparse_layers)
        computed = sum(len(p) + NEW - 1 for p in ps)
        m = llm.engine.moe_metrics
        assert m.total_routed() == computed * hf_config(name).num_experts_per_tok * moe_layers
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
