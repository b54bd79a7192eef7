"""Tensor and expert parallelism (Ray, CPU ranks, gloo, float64) for this slice of issue 96:
- MiMo-V2 (MiMoV2ForCausalLM): the fused self_attn.qkv_proj cut at load into each rank's q rows and its kv heads'
  k / v rows (the full layers' one kv head replicated at TP 2, the sliding layers' two split), against one rank;
- GLM-4.7-Flash (Glm4MoeLiteForCausalLM): MLA heads split, at TP 2 against one rank, and its experts at EP 2 against
  transformers;
- Phi-3.5-MoE (PhiMoEForCausalLM): the LayerNorms whole on every rank, q/k/v/o biases by heads, the LM head's bias
  by vocab rows with the head, at TP 2 against one rank; SparseMixer routing at EP 2 against transformers.
Lean: 3-4 prompts, 4 new tokens each."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.models.deepseek.tiny import GLM4_MOE_LITE
from moelink.engine.models.phimoe.tiny import PHIMOE
from moelink.engine.tools import tiny_archs

from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4)
NEW = 4


def _mimo_v2(out) -> str:
    tiny_archs.ARCHS["mimo_v2"].write(out, seed=0, dtype=torch.float64, fmt="float", overrides={})
    return str(out)


WRITERS = {"mimo_v2": _mimo_v2, "glm4_moe_lite": lambda out: save_preset(out, GLM4_MOE_LITE),
           "phimoe": lambda out: save_preset(out, PHIMOE)}


@pytest.mark.parametrize("name", list(WRITERS))
def test_tp_2_matches_one_rank(local_ray, tmp_path, name):
    path = WRITERS[name](tmp_path / name)
    ps = prompts(VOCAB, seed=89, n=3, lo=1, hi=30)
    want = engine_greedy(LLM(path, **KW), ps, max_new=NEW)
    llm = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", ["glm4_moe_lite", "phimoe"])
def test_ep_2_matches_transformers(local_ray, tmp_path, name):
    path = WRITERS[name](tmp_path / name)
    ps = prompts(VOCAB, seed=97, n=4, lo=1, hi=60)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy(path, ps, max_new=NEW), ps)
    finally:
        llm.engine.shutdown()
