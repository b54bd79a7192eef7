"""Expert and tensor parallelism (Ray, CPU ranks, gloo, float64) for LFM2-MoE and Cohere2-MoE (issue 96):
- LFM2-MoE (Lfm2MoeForCausalLM): its sigmoid-routed experts with the expert bias at EP 2 against transformers (the
  short-conv layers' states stay on each rank's own sequences); TP is refused for its short-conv layers;
- Cohere2-MoE (Cohere2MoeForCausalLM): experts at EP 2 against transformers, and the parallel layer at TP 2 (the
  LayerNorm whole on every rank, q/k/v/o biases by heads, the interleaved rope on split heads, the averaged shared
  MLP's halves folded into each rank's down projection) against one rank.
Lean: 3-4 prompts, 4 new tokens each."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.models.cohere2_moe.tiny import COHERE2_MOE
from moelink.engine.models.lfm2_moe.tiny import LFM2_MOE

from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4)
NEW = 4
PRESETS = {"lfm2_moe": LFM2_MOE, "cohere2_moe": COHERE2_MOE}


@pytest.mark.parametrize("name", list(PRESETS))
def test_ep_2_matches_transformers(local_ray, tmp_path, name):
    path = save_preset(tmp_path / name, PRESETS[name])
    ps = prompts(VOCAB, seed=97, n=4, lo=1, hi=60)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy(path, ps, max_new=NEW), ps)
    finally:
        llm.engine.shutdown()


def test_cohere2_moe_tp_2_matches_one_rank(local_ray, tmp_path):
    path = save_preset(tmp_path / "cohere2_moe", COHERE2_MOE)
    ps = prompts(VOCAB, seed=89, n=3, lo=1, hi=30)
    want = engine_greedy(LLM(path, **KW), ps, max_new=NEW)
    llm = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
