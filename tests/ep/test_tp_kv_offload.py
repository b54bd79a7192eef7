"""The KV offload tiers under tensor parallelism on Ray (CPU ranks, gloo, float64): a TP group has one scheduler
half, which counts slots from one rank's block bytes (its kv heads, or the whole MLA latent), and every rank of the
group saves and loads its own cache's rows under the same slot numbers; a load is reported only once every rank of
the group has written it. A prompt evicted from the device pool loads back from the host tier (and from disk below a
small host tier) with greedy outputs equal to one engine's without offload, and every block free after."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.engine.kv_transfer.offload_compose import WithOffload

from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
# qwen3_e6k3: 2 layers, 2 kv heads of 16, float64, B=4: a rank of TP 2 holds one kv head's k and v.
RANK_BLOCK_BYTES = 2 * 4 * 1 * 16 * 8 * 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _tokens(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]


def _evict_and_reload(llm, target, others):
    _tokens(llm, [target])
    for p in others:  # a 20-block pool: each 40-token prompt pushes the earlier ones' blocks out to the tiers
        _tokens(llm, [p])
    return _tokens(llm, [target])


@pytest.mark.parametrize("disk", [False, True], ids=["host", "disk"])
def test_tp2_offload_loads_back_equal(local_ray, tiny_model, tmp_path, disk):
    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=51, n=4, lo=40, hi=41)
    with LLM(path, **KW) as llm:
        want = _tokens(llm, [target])
    # "disk": a 12-block host tier (a load stages its blocks through host slots), so the target's blocks are pushed
    # down to each rank's file as the others arrive.
    cfg = (OffloadConfig(host_bytes=12 * RANK_BLOCK_BYTES, disk_bytes=64 * RANK_BLOCK_BYTES, disk_dir=str(tmp_path))
           if disk else OffloadConfig(host_bytes=1 << 30))
    with LLM(path, tensor_parallel_size=2, kv_connector=OffloadKVConnector(cfg), **KW) as llm:
        conn = llm.engine.config.kv_connector  # the engine's copy, bound to its TP layout
        assert conn.tp_size == 2 and conn.block_bytes == RANK_BLOCK_BYTES  # one rank's heads, not the model's
        assert _evict_and_reload(llm, target, others) == want
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        stats = conn.offload_tier_stats()
        hits = stats["host"].hits + stats["disk"].hits
        assert hits == 10, stats  # the target's 10 whole blocks (40 tokens), none recomputed
        if disk:
            assert stats["disk"].hits > 0 and stats["host"].evicted > 0, stats
        # A group's bytes: both ranks moved one rank's block bytes per block.
        assert stats["host"].loaded_bytes + stats["disk"].loaded_bytes == 2 * RANK_BLOCK_BYTES * hits
        assert conn.tier_index(0).num_pinned() == 0, "a slot left pinned after every load was reported"
    if disk:
        assert not list(tmp_path.iterdir()), "the ranks' disk files outlive the engine"


def test_tp2_ep2_mla_offload_loads_back_equal(local_ray, hf_tiny_model):
    """DeepSeek-V3 (MLA: the latent whole on every rank, so each rank's tier holds its own copy) at -tp 2 -ep 2:
    two TP groups, a scheduler half each, experts in EP over the four ranks."""
    path = hf_tiny_model("dsv3_lora")
    target, *others = prompts(200, seed=52, n=4, lo=40, hi=41)
    with LLM(path, **KW) as llm:
        want = _tokens(llm, [target])
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    with LLM(path, tensor_parallel_size=2, expert_parallel_size=4, kv_connector=conn, **KW) as llm:
        bound = llm.engine.config.kv_connector
        assert bound.tp_size == 2
        # Route every prompt to the same group (least loaded: one request at a time, the first group each time).
        assert _evict_and_reload(llm, target, others) == want
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        assert bound.offload_tier_stats()["host"].hits > 0


def test_offload_beside_pd_binds_both_halves_under_tp():
    """WithOffload under TP: both halves bound (the tiers' join, the PD connector's head map); a PD half with no TP
    binding is refused naming it."""
    from moelink.engine.kv_transfer.config import RemoteKVConfig
    from moelink.engine.kv_transfer.remote import RemoteKVConnector

    tiers = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20))
    both = WithOffload(RemoteKVConnector(RemoteKVConfig(port=None), "kv_consumer"), tiers)
    bound = both.for_tensor_parallel(2, 4, world_size=2)
    assert bound.offload.tp_size == 2 and bound.pd.shard.tp_size == 2
    assert tiers.tp_size == 1  # the caller's connector is not changed

    class _NoTP:
        name = "x"

    with pytest.raises(ValueError, match="_NoTP.*tensor_parallel_size=2"):
        WithOffload(_NoTP(), tiers).for_tensor_parallel(2, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        tiers.for_tensor_parallel(0, 4)
