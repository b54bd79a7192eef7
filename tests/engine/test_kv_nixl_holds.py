"""What saves held in a prefill rank's cache (NIXL in place, engine/kv_transfer/nixl_inplace.py) may keep out of its
pool, and how they leave it (issue 53 finding 1): the store's held entries and every way out, the bounds per rank and
per client (the oldest released first, counted), a client that never fetches against another's admission, a hold's
bytes where layers share their tensors, and the scheduler's held save. The fetch path itself is
tests/engine/test_kv_nixl_inplace.py's."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.contract.kv_blocks import PagedKVBlocks
from moelink.engine.kv_transfer.nixl import nixl_available
from moelink.engine.kv_transfer.nixl_inplace import HoldRegion
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.kv_transfer.store import SavedKVStore
from moelink.scheduler.outputs import KVTransfer

from tests.engine.test_kv_nixl import TOKENS, settle
from tests.engine.test_kv_nixl_inplace import SAVE, UNBOUNDED, _free
from tests.helpers.kv_disagg import KW, MAX_NEW, one_engine
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed")


def test_held_entries_are_never_evicted_and_every_way_out_is_released():
    now = [0.0]
    store = SavedKVStore(ttl_s=10.0, max_bytes=1, clock=lambda: now[0])
    src = [tuple(torch.randn(6, 4, 2, 8) for _ in range(2))]
    kv = PagedKVBlocks(src, None, 4)
    from moelink.engine.kv_transfer.nixl_inplace import HeldKV

    def held(tid):  # a HeldKV as HoldRegion.held makes it
        return HeldKV(10, tuple(TOKENS), kv.layout, [([0, 1, 2], ())], transfer_id=tid)

    a, b = held(1), held(2)
    store.hold("a", a, 5.0, UNBOUNDED)
    store.hold("b", b, 50.0, UNBOUNDED)
    assert len(store) == 2 and store.nbytes == 0  # nothing in host memory, nothing evicted past max_bytes
    assert store.peek("a") is a and store.take("a", a) and store.released() == []  # claimed: held until release
    store.release(a)
    now[0] = 60.0
    assert sorted(store.released()) == [1, 2] and store.counters.num_hold_expired == 1
    store.hold("c", held(3), 5.0, UNBOUNDED)
    store.clear()
    assert store.released() == [3] and len(store) == 0
    store.hold("d", held(4), 5.0, UNBOUNDED)
    store.drop_held()  # an elastic rewind: the scheduler freed the blocks already, nothing to report
    assert store.released() == [] and len(store) == 0


def test_held_blocks_are_bounded_per_rank_and_per_client_oldest_released_first():
    """Saves no decode engine fetches must not hold the pool (issue 53 finding 1): held blocks name at most
    nixl_hold_fraction of the rank's cache, one client's at most nixl_hold_client_fraction; a new hold releases the
    client's own oldest past its share, then anyone's oldest past the total (reported to the scheduler, which frees
    their blocks; counted); a save alone past a bound, or one that did not ask for the handoff itself, is copied."""
    from moelink.engine.kv_transfer.auth import new_capability
    from moelink.engine.kv_transfer.config import SaveKey
    from moelink.engine.kv_transfer.remote import RemoteWorkerSide

    src = [tuple(torch.randn(16, 4, 2, 8) for _ in range(2))]  # 16 blocks: 512 bytes a block over both tensors
    kv = PagedKVBlocks(src, None, 4)
    side = RemoteWorkerSide(RemoteKVConfig(port=free_port(), transport="nixl", nixl_hold_fraction=0.25,
                                           nixl_hold_client_fraction=0.125), 0)
    try:
        side.cache_allocated(kv)
        def save(tid, blocks, client, hold=True):
            side.start_save(KVTransfer(tid, "r", blocks, 4 * len(blocks), token_ids=tuple(range(4 * len(blocks))),
                                       params=SaveKey(new_capability(), hold, client)), kv)
        save(1, [0], ("10.0.0.1",))
        save(2, [1], ("10.0.0.1",))
        save(3, [2], ("10.0.0.1",))  # the client's share is 2 blocks: its oldest hold (1) goes
        assert side.poll() == {1: False} and side.store.counters.num_hold_evicted == 1  # released unread
        save(4, [3], ("10.0.0.2",))
        save(5, [4], ())  # anonymous: the total only (4 blocks): nothing released yet
        save(6, [5], ("10.0.0.3",))  # past the total: the oldest hold of anyone's (2) goes
        assert side.poll() == {2: False} and side.store.counters.num_hold_evicted == 2
        save(7, [6, 7, 8], ("10.0.0.4",))  # alone past the client's share: copied, reported at once
        save(8, [9], ("10.0.0.4",), hold=False)  # a role default's save: copied
        assert side.poll() == {7: True, 8: True}
        assert side.store.counters.num_held == 6 and side.store.held_nbytes == 4 * 512
    finally:
        side.close()


def test_the_scheduler_keeps_a_held_saves_blocks_without_stepping_for_it():
    """scheduler/kv_connector.py's held save (`holds_saves`): its blocks stay referenced after the request ends,
    but the engine is not kept stepping for it back to back: busy and awaited once per HELD_POLL_S (here never,
    then always); any later step's report frees them."""
    from tests.helpers.scheduler_sim import make_request
    from tests.scheduler.test_kv_connector import FakeConnector, _report, _scheduler

    conn = FakeConnector(save={"a"})
    conn.holds_saves = True
    s = _scheduler(conn)
    s.kv_transfers.HELD_POLL_S = float("inf")
    s.add_request(make_request("a", [1, 2, 3, 4, 5, 6], max_tokens=1))
    so = s.schedule()
    (t,) = so.kv_transfers.saves
    (out,) = _report(s, so, None, {"a": [9]})
    assert out.finish_reason == "length" and s.stats().num_free_blocks == 14  # held by the save
    so = s.schedule()
    assert so.finished_req_ids == {"a"} and so.kv_transfers is None  # nothing awaited: no step for the hold
    _report(s, so, None)
    assert not s.has_finished_requests() and s.stats().num_free_blocks == 14
    s.check_invariants()
    s.kv_transfers.HELD_POLL_S = 0.0  # due: an idle engine steps once for it, its worker polls
    assert s.has_finished_requests()
    so = s.schedule()
    assert so.kv_transfers.num_awaited == 1
    _report(s, so, None)
    s.add_request(make_request("b", [7, 8], max_tokens=1))  # the next work's step reports the hold over
    so = s.schedule()
    _report(s, so, {t.transfer_id: True}, {"b": [3]})
    assert conn.done == [("a", "save", True)]
    s.check_invariants()
    while s.has_unfinished_requests() or s.has_finished_requests():
        _report(s, s.schedule(), None)
    assert s.stats().num_free_blocks == 16


def _step_until_idle(llm) -> int:
    steps = 0
    while llm.engine.has_requests():
        llm.engine.step()
        steps += 1
        assert steps < 2000
    return steps


def test_a_client_that_never_fetches_cannot_starve_admission(tiny_model):
    """Issue 53 finding 1 (hold exhaustion) on a real prefill engine: one client floods it with saves it never
    fetches. Its holds keep at most its share of the pool (the oldest released first, counted), so another
    client's requests are admitted and finish in as many steps as on an idle engine, with one engine's tokens; the
    requests of a prefill server's role default (they did not ask for the handoff) hold nothing at all."""
    from dataclasses import replace

    from moelink.engine.core.outputs import OutputKind

    path = tiny_model("qwen3_e6k3")
    flood = prompts(300, seed=31, n=30, lo=16, hi=17)  # 4 blocks each: 120 blocks, past the 96-block pool
    victims = prompts(400, seed=32, n=4, lo=6, hi=12)
    want = one_engine(path, victims)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="nixl", nixl_hold_fraction=0.25,
                                            nixl_hold_client_fraction=0.125))
    with LLM(path, kv_connector=conn, **KW) as pre:
        total = _free(pre)[1]

        def add(rid, prompt, params, client):
            processed = replace(pre.engine.process_inputs(rid, prompt, params), client=client)
            pre.engine.add_processed(processed, OutputKind.FINAL_ONLY)

        for i, v in enumerate(victims):
            add(f"base{i}", v, greedy, ("10.0.0.2",))
        idle_steps = _step_until_idle(pre)
        for i, p in enumerate(flood):
            add(f"flood{i}", p, SAVE, ("10.0.0.66",))
        _step_until_idle(pre)
        kv_stats = pre.engine.stats().kv_transfer
        share = int(total * 0.125)
        assert 0 < kv_stats.held_blocks <= share and _free(pre)[0] >= total - share
        assert kv_stats.holds_unread >= len(flood) - share // 4  # the oldest released for the newest
        outs = {}
        for i, v in enumerate(victims):
            add(f"v{i}", v, greedy, ("10.0.0.2",))
        steps = 0
        while pre.engine.has_requests():
            for o in pre.engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
            steps += 1
        assert steps == idle_steps and [outs[f"v{i}"] for i in range(len(victims))] == want
        # A prefill server's role default (smg's PD mode sends the prefill leg no parameters): copied, not held.
        side = pre.engine.executor.runner.plugin("kv_transfer").connector
        held_before = side.store.counters.num_held
        by_role = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                 kv_transfer_params=KVTransferParams(do_remote_decode=True, by_role_default=True))
        for i, p in enumerate(flood[:5]):
            add(f"role{i}", p, by_role, ("10.0.0.67",))
        _step_until_idle(pre)
        settle(pre)
        assert side.store.counters.num_held == held_before and pre.engine.stats().kv_transfer.held_blocks <= share


def test_a_holds_bytes_count_each_block_row_once_where_layers_share_their_tensors():
    """gpt-oss's sliding and full layers share their cache tensors (two block tables over one pool): a hold names
    the blocks of both tables, and the bounds count each (tensor, block) row once, whichever tables list it."""
    shared = tuple(torch.zeros(12, 4, 2, 8) for _ in range(2))  # one pool: 256 bytes a row, two tensors
    kv = PagedKVBlocks([shared, shared], [(0, 1)], 4)
    row = 2 * 4 * 2 * 8 * 4
    region = HoldRegion(kv)
    apart = region.held(KVTransfer(1, "r", [0, 1, 2], 12, sliding_block_ids=[3, 4, 5], token_ids=tuple(range(12))))
    assert apart.nbytes == 6 * row  # six distinct blocks in one pool
    same = region.held(KVTransfer(2, "r", [0, 1, 2], 12, sliding_block_ids=[0, 1, 2], token_ids=tuple(range(12))))
    assert same.nbytes == 3 * row  # listed by both tables, held once


def test_a_kv_port_in_use_fails_the_start_with_no_nixl_agent_left_open():
    """The KV server cannot bind (another process holds the port): the start fails naming it, and the transport's
    NIXL agent (a UCX progress thread) is closed behind the error (found in the suite: a port race left one open)."""
    import socket

    from moelink.engine.kv_transfer import nixl
    from moelink.engine.kv_transfer.remote import RemoteWorkerSide

    before = set(map(id, nixl.open_agents()))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            RemoteWorkerSide(RemoteKVConfig(port=port, transport="nixl"), 0)
    # Checked while the error (and its frames, which hold the half-made transport) is still held, as a caller that
    # reports or logs it holds it.
    assert info.value is not None and [a for a in nixl.open_agents() if id(a) not in before] == []
