"""The two dispatch modes on Ray (CPU ranks, gloo): EP 2/3/4 equal one rank token for token in float64.

The fixed-capacity backend ("torch_padded") runs as the two-mode all-to-all: the driver plans every step
(engine/contract/ep_step.py), prefill and mixed steps run high-throughput at the step's largest tokens-per-rank, decode
steps low-latency at a decode capacity of 3, so decode steps where a rank holds more than 3 sequences fall back
to high-throughput (exact either way). Qwen3-MoE, Mixtral and DeepSeek-V3 (MLA, shared experts, sigmoid
group-limited router). Three cases, to keep Ray time bounded.
"""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=128, block_size=16)


def _prompts(vocab: int, seed: int, n: int = 12):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(n)]


def _greedy(llm, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=2 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("name,ep", [("qwen3_e6k3", 2), ("mixtral_e5k3", 3), ("dsv3_lora", 4)])
def test_two_modes_on_ray_match_one_rank(local_ray, tiny_model, hf_tiny_model, name, ep):
    path = hf_tiny_model(name) if name.startswith("dsv3") else tiny_model(name)
    prompts = _prompts(200, seed=ep)
    want = _greedy(LLM(path, **KW), prompts)
    llm = LLM(path, expert_parallel_size=ep, all_to_all="torch_padded", ep_decode_capacity=3, **KW)
    try:
        assert _greedy(llm, prompts) == want
        modes = llm.engine.moe_metrics.per_mode
        assert modes["low_latency"]["steps"] > 0 and modes["high_throughput"]["steps"] > 0
        for m in modes.values():
            # Payload rows (one per token and destination rank) never exceed what the wire carried.
            assert 0 < m["rows"] <= m["wire_rows"] and m["bytes"] <= m["wire_bytes"]
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()
