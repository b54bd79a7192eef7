"""Expert parallelism on Ray (CPU, gloo) for Nemotron-H (NemotronHForCausalLM) with Nemotron 3 Super's latent MoE:
its Mamba2 states stay on the rank that runs the sequence, its routed relu^2 experts are placed 4/4 over EP 2 and
what crosses is the token's latent projection (moe_latent_size wide, not hidden_size); the shared expert never leaves
a rank. Greedy outputs equal transformers' in float64, every routed (token, expert) pair counted once."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.models.nemotron_h.tiny import NEMOTRON_H

from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import MAX_NEW, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow


def test_nemotron_h_latent_ep2_matches_transformers(local_ray, tmp_path):
    path = save_preset(tmp_path, NEMOTRON_H)
    ps = prompts(VOCAB, seed=5, n=6, hi=100)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=16)
    try:
        assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
        computed = sum(len(p) + MAX_NEW - 1 for p in ps)
        m = llm.engine.moe_metrics
        assert m.total_routed() == computed * 2 * 2  # top-2, two routed layers
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
