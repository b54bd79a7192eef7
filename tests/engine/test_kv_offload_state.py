"""The KV offload tiers for caches beyond one full-attention table (engine/kv_transfer/offload.py): a model whose
sliding-window layers keep their own block table (gpt-oss, scheduler/sliding_kv.py) has both tables' evicted
blocks saved and a prefix loaded back with the window its first recomputed token sees, greedy tokens equal to an
engine without offload; an abort while loading frees every block and slot; a prefix whose window is not in the
tiers is not loaded. A model with per-sequence state (Qwen3-Next, scheduler/hybrid_cache.py) has a state
checkpoint saved with the block it follows and loaded into the request's state slot with the blocks."""
from __future__ import annotations


import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.scheduler.block_pool import extend_block_hashes
from moelink.scheduler.request import RequestStatus
from moelink.scheduler.sliding_kv import sliding_block_hash

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
from tests.helpers.parity import prompts

# Blocks of 4 tokens and a 6-token window (tests/helpers/gpt_oss_checkpoints.py); 16-token chunks, so the
# sliding table frees (and the pool caches, then evicts) out-of-window blocks while a prompt is computed.
KW = dict(dtype="float64", num_kv_blocks=28, block_size=4, max_num_batched_tokens=16, max_model_len=64,
          skip_warmup=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _run(llm, ps):
    return [(o.outputs[0].token_ids, o.num_cached_tokens) for o in llm.generate(ps, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = save_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "m", num_hidden_layers=2)
    target, *others = prompts(400, seed=51, n=4, lo=40, hi=41)  # 40 tokens each: 10 blocks per table
    with LLM(path, **KW) as llm:
        want = _run(llm, [target])[0][0]
    return path, target, others, want


BLOCK_BYTES = 2 * 4 * 2 * 16 * 8  # k and v, B=4, 2 kv heads x 16, float64: one tensor set (the pair's shared one)


def _evicted_target(case, cfg=None):
    path, target, others, _ = case
    conn = OffloadKVConnector(cfg or OffloadConfig(host_bytes=1 << 30))
    llm = LLM(path, kv_connector=conn, **KW)
    assert _run(llm, [target])[0][1] == 0
    for p in others:  # each fills the device pool: the target's blocks of both tables go to the host tier
        _run(llm, [p])
    return llm, conn


def _abort_while_loading(llm, conn, target, gated_load, while_loading=lambda: True) -> None:
    """Request `target` (its prefix in the tiers), abort it while its load is held on the loader thread
    (`gated_load`), let the load land: the engine ends idle, every block and tier slot back."""
    gate, landed = gated_load
    eng, sched = llm.engine, llm.engine.schedulers[0]
    eng.add_request("t", target, GREEDY)
    eng.step()
    assert sched.requests["t"].status is RequestStatus.WAITING_FOR_KV and while_loading()
    eng.abort_requests(["t"])
    gate.set()
    assert landed.wait(60)
    for _ in range(3):
        eng.step()
    assert _idle(llm, conn) and not eng.has_requests()


def _idle(llm, conn) -> bool:
    sched = llm.engine.schedulers[0]
    index = conn.tier_index(0)
    index.check()
    return sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks and index.num_pinned() == 0


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_sliding_window_prefix_loads_back_with_its_window_and_decodes_as_without_offload(case, tier, tmp_path):
    _, target, _, want = case
    # "disk": a 12-block host tier, so the target's blocks of both tables are pushed down to the file.
    cfg = None if tier == "host" else \
        OffloadConfig(host_bytes=12 * BLOCK_BYTES, disk_bytes=1 << 30, disk_dir=str(tmp_path / "kv"))
    llm, conn = _evicted_target(case, cfg)
    with llm:
        assert not llm.engine.schedulers[0].kv.pool.find_cached_prefix(target)  # evicted from the device
        got = _run(llm, [target])
        assert _idle(llm, conn)
    stats = conn.offload_tier_stats()
    assert conn.block_bytes == BLOCK_BYTES  # a slot holds the shared tensors once, whichever table the block was in
    assert got == [(want, 39)]  # every block but the last prompt token, which is computed for its logits
    # 10 full-table blocks and the sliding table's window before token 39 (6 tokens: blocks 8 and 9).
    assert stats["host"].hits + stats["disk"].hits == 12 and stats[tier].hits > 0
    assert stats["host"].loaded_bytes + stats["disk"].loaded_bytes == 12 * BLOCK_BYTES


def test_a_prefix_whose_window_left_the_tiers_is_loaded_only_up_to_where_its_window_is_there(case):
    _, target, _, want = case
    llm, conn = _evicted_target(case)
    with llm:
        keys = extend_block_hashes([], target, 4)
        conn.tier_index(0).drop([sliding_block_hash(keys[9])])  # the sliding block every 10-block hit needs
        got = _run(llm, [target])
        assert _idle(llm, conn)
    host = conn.offload_tier_stats()["host"]
    # Shortened to 9 blocks (36 tokens: token 36's window, sliding blocks 7 and 8, is there), the rest computed.
    assert got == [(want, 36)] and host.hits == 9 + 2


def test_an_abort_while_loading_a_sliding_prefix_frees_every_block_and_slot(case, gated_load):
    _, target, _, _ = case
    llm, conn = _evicted_target(case)
    with llm:
        _abort_while_loading(llm, conn, target, gated_load)


HYBRID = dict(dtype="float64", num_kv_blocks=24, block_size=4, max_num_batched_tokens=64, max_model_len=64,
              skip_warmup=True)


@pytest.fixture(scope="module")
def hybrid_case(hf_tiny_model):
    path = hf_tiny_model("qwen3_next")
    target, *others = prompts(200, seed=61, n=4, lo=40, hi=41)
    with LLM(path, **HYBRID) as llm:
        want = _run(llm, [target])[0][0]
    return path, target, others, want


def _evicted_hybrid_target(hybrid_case, num_others: int = 3):
    path, target, others, _ = hybrid_case
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    llm = LLM(path, kv_connector=conn, **HYBRID)
    assert _run(llm, [target])[0][1] == 0
    for p in others[:num_others]:
        _run(llm, [p])
    return llm, conn


def test_a_linear_attention_prefix_loads_back_with_its_state_checkpoint(hybrid_case):
    """Qwen3-Next: the target's blocks and the state checkpoint at its last whole block before the final token
    (36 tokens: hybrid_cache.checkpoint_boundary) go to the host tier as the device evicts them; the target again
    loads both (the state into its slot) and resumes from token 36, decoding an engine without offload's tokens."""
    _, target, _, want = hybrid_case
    llm, conn = _evicted_hybrid_target(hybrid_case)
    with llm:
        sched = llm.engine.schedulers[0]
        assert not sched.kv.pool.find_cached_prefix(target)
        got = _run(llm, [target])
        assert _idle(llm, conn) and conn._sides[0].states.num_pinned() == 0
        sched.kv.check_invariants()
    assert got == [(want, 36)]
    assert conn.offload_tier_stats()["host"].hits == 9 and conn._sides[0].states.stats["host"].hits == 1


def test_a_linear_attention_prefix_whose_head_stayed_on_the_device_loads_that_head_too(hybrid_case):
    """Two others evict only the target's tail (the pool evicts a sequence's last blocks first): its head is still
    cached on the device but has no checkpoint at its end, so the device hit is 0; the head's blocks are copied up
    by the step's tier work and loaded with the tail and the state (offload.py num_loadable_tokens)."""
    _, target, _, want = hybrid_case
    llm, conn = _evicted_hybrid_target(hybrid_case, num_others=2)
    with llm:
        sched = llm.engine.schedulers[0]
        head = len(sched.kv.pool.find_cached_prefix(target))
        stored = conn.offload_tier_stats()["host"].stored
        got = _run(llm, [target])
        assert _idle(llm, conn) and conn._sides[0].states.num_pinned() == 0
        sched.kv.check_invariants()
    stats = conn.offload_tier_stats()["host"]
    assert got == [(want, 36)] and stats.hits == 9 and stats.stored - stored >= head
    assert 0 < head < 9


def test_an_abort_while_loading_a_linear_attention_prefix_frees_its_blocks_and_state_slot(hybrid_case, gated_load):
    _, target, _, _ = hybrid_case
    llm, conn = _evicted_hybrid_target(hybrid_case)
    with llm:
        sched = llm.engine.schedulers[0]
        _abort_while_loading(llm, conn, target, gated_load,
                             while_loading=lambda: sched.kv.state_slot("t") is not None)
        assert sched.kv.slots.num_free == sched.kv.slots.num_slots and conn._sides[0].states.num_pinned() == 0
        sched.kv.check_invariants()
