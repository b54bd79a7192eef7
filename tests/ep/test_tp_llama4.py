"""Llama 4 (Llama4ForCausalLM) under tensor and expert parallelism (Ray, CPU ranks, gloo, float64): at TP 2 every
expert's channels split over the ranks (the fused gate_up_proj's gate and up columns, down_proj's rows, the shared
expert alike), the attention's heads split with their de-interleaved q/k rows, against one rank; at EP 2 each rank's
experts' rows of the fused tensors, against transformers. Prompts of up to 60 tokens cross chunks of 16 (chunked
attention's virtual sequences on every rank). Lean: 3-4 prompts, 4 new tokens each."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.models.llama4.tiny import LLAMA4, LLAMA4_MAVERICK

from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
NEW = 4


def test_tp_2_matches_one_rank(local_ray, tmp_path):
    """Maverick's layout: dense layers (intermediate_size_mlp split) between MoE ones."""
    path = save_preset(tmp_path, LLAMA4_MAVERICK)
    ps = prompts(VOCAB, seed=89, n=3, lo=1, hi=60)
    want = engine_greedy(LLM(path, **KW), ps, max_new=NEW)
    llm = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_ep_2_matches_transformers(local_ray, tmp_path):
    path = save_preset(tmp_path, LLAMA4)
    ps = prompts(VOCAB, seed=97, n=4, lo=1, hi=60)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy(path, ps, max_new=NEW), ps)
    finally:
        llm.engine.shutdown()
