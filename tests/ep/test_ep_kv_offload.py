"""The KV offload tiers at EP 2 on Ray (CPU, gloo): the connector travels to each rank as its config, each rank
allocates its own tiers, and each rank's scheduler half (on the driver) decides for it; a prompt evicted from its
rank's device pool loads back from that rank's host tier, greedy outputs equal to one engine's, every pool free."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector

from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
BLOCK_BYTES = 2 * 4 * 2 * 16 * 8 * 2  # k and v, B=4, 2 kv heads x 16, float64, x 2 layers (qwen3_e6k3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _tokens(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]


def test_ep2_ranks_offload_to_their_own_tiers(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=51, n=4, lo=40, hi=41)
    with LLM(path, **KW) as llm:
        want = _tokens(llm, [target])
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    # The ranks are other processes: the driver's scheduler halves count slots from one block's bytes, which the
    # engine gives the connector from its config (`configure`, called before the scheduler halves exist).
    assert conn.block_bytes is None
    with LLM(path, expert_parallel_size=2, kv_connector=conn, **KW) as llm:
        assert conn.block_bytes == BLOCK_BYTES
        _tokens(llm, [target])
        for p in others:
            _tokens(llm, [p])
        assert _tokens(llm, [target]) == want
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    stats = conn.offload_tier_stats()["host"]
    assert stats.stored > 0 and stats.hits > 0
