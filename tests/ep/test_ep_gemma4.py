"""Gemma 4 (Gemma4ForCausalLM, the 26B-A4B's layout) over Ray CPU ranks (gloo, float64): its experts at EP 2 against
transformers (each rank's experts' rows of the fused gate_up_proj / down_proj; the router's per-expert scale applied
to every pick before the dispatch, the dense MLP beside the experts whole on every rank), and tensor parallelism
refused naming it. Lean: 4 prompts crossing the sliding window, 4 new tokens each."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.models.gemma4.tiny import GEMMA4, save_gemma4

from tests.helpers.drawn_presets import VOCAB
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4)
NEW = 4


def test_ep_2_matches_transformers(local_ray, tmp_path):
    path = save_gemma4(tmp_path / "gemma4", GEMMA4, seed=7)
    ps = prompts(VOCAB, seed=97, n=4, lo=1, hi=60)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy(path, ps, max_new=NEW), ps)
    finally:
        llm.engine.shutdown()


def test_tp_2_is_refused(local_ray, tmp_path):
    path = save_gemma4(tmp_path / "gemma4", GEMMA4, seed=7)
    with pytest.raises(Exception, match=r"Gemma4ForCausalLM under tensor parallelism is not supported yet"):
        LLM(path, tensor_parallel_size=2, **KW)
