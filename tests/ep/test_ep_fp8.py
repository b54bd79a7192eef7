"""FP8 experts under EP 2 on Ray (gloo), with two redundant replicas and online EPLB moving FP8 experts (weights
and block scales) between the ranks while serving: the greedy tokens of one rank."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.fp8_checkpoints import VOCAB

pytestmark = pytest.mark.slow


# dsv3_fp8_ragged: experts 12 wide in 16-row blocks, so each expert's up rows sit past a zero gap (moved too).
@pytest.mark.parametrize("name", ["dsv3_fp8", "dsv3_fp8_ragged"])
def test_ep2_with_replicas_matches_one_rank(local_ray, fp8_tiny, name):
    _, dst, _ = fp8_tiny(name)
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(dst, **kw).generate(prompts, params, use_tqdm=False)]
    llm = LLM(dst, expert_parallel_size=2, num_redundant_experts=2, eplb_interval=2, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
        m = llm.engine.expert_load().eplb
        print(f"\nFP8 EPLB at EP 2: {m['rebalances']} rebalances, {m['bytes_moved']} bytes moved, peak staged "
              f"{m['peak_staged_bytes']} of {m['staging_budget_bytes']} bytes")
        # Experts moved mid-stream (FP8 weights with their scales): the tokens above stayed one rank's.
        assert m["rebalances"] >= 1 and m["bytes_moved"] > 0
        assert 0 < m["peak_staged_bytes"] <= m["staging_budget_bytes"]
    finally:
        llm.engine.shutdown()
