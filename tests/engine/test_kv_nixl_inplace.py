"""NIXL in place (engine/kv_transfer/nixl_inplace.py, issue 47 item 1; scoped in issue 53): a saved request's
blocks held in the prefill rank's cache (not copied at save time, nothing of the cache registered) until a fetch
claims them: then exactly its rows are staged out, the hold ends, and only that copy is registered for the one
fetch, which the decode rank READs straight into its own blocks (its cache registered once). Whole engines (GQA,
MLA) against one engine, with the copies and registrations counted; hold expiry; the side channel's refusals
before any descriptor leaves; abort and shutdown; a long prompt's reply header. The read cut mid-way is
tests/engine/test_kv_nixl.py's; what a fetcher can reach with the metadata it got is test_kv_nixl_scope.py's; what
holds may keep out of the pool, and the scheduler's held save, test_kv_nixl_holds.py's."""
from __future__ import annotations

import threading

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.kv_transfer.arrival import ArrivalWriter
from moelink.engine.kv_transfer.auth import SecretAuth
from moelink.engine.contract.kv_blocks import PagedKVBlocks
from moelink.engine.kv_transfer.nixl import nixl_available
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.kv_transfer.store import HoldBounds, SavedKVStore
from moelink.engine.kv_transfer.transport import make_transport
from moelink.engine.kv_transfer.wire import KVFetchError
from moelink.scheduler.outputs import KVTransfer

from tests.engine.test_kv_nixl import TOKENS, request_without_handshake, settle
from tests.helpers.kv_disagg import KW, MAX_NEW, Decoder, one_engine
from tests.helpers.kv_params import SECRET
from tests.helpers.net import free_port
from tests.helpers.parity import prompts
from tests.helpers.waits import wait_until

UNBOUNDED = HoldBounds(1 << 40, 1 << 40)

pytestmark = pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed")

SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))


def _decode_params(outs):
    return [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                           kv_transfer_params=o.kv_transfer_params) for o in outs]


def _free(llm) -> tuple[int, int]:
    s = llm.engine.stats()
    return s.num_free_blocks, s.num_total_blocks


@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_pd_parity_reading_the_prefill_blocks_in_place(kind, tiny_model, hf_tiny_model, monkeypatch):
    """Greedy tokens equal one engine's; no host copy of the KV on either side (the save never reads the blocks
    out, the decode READs into its own blocks: nothing staged); each cache registered once, whatever the fetches;
    the prefill blocks held until read, then back in its pool."""
    path = tiny_model("qwen3_e6k3") if kind == "gqa" else hf_tiny_model("dsv3_lora")
    ps = prompts(200, seed=5, n=3, lo=5, hi=23)  # one block and a bit, up to six; partial last blocks
    want = one_engine(path, ps)
    copies = []
    for name in ("read", "read_async"):
        real = getattr(PagedKVBlocks, name)
        monkeypatch.setattr(PagedKVBlocks, name, lambda self, t, _r=real: copies.append(t) or _r(self, t))
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="nixl", secret=SECRET))
    with LLM(path, kv_connector=conn, **KW) as pre:
        side = pre.engine.executor.runner.plugin("kv_transfer").connector
        # Nothing of the cache is registered with the serving agent, ever (a peer never gets a key to it).
        assert side.transport.agent(serving=True).regions.num_registered == 0
        outs = pre.generate(ps, SAVE, use_tqdm=False)
        free, total = _free(pre)
        assert free < total and copies == []  # held for the decode engine, though every request finished: no copy
        dec = Decoder(path, RemoteKVConfig(transport="nixl", secret=SECRET))
        try:
            assert dec.worker.transport.agent(serving=False).regions.num_registered == 1  # at allocation too
            dec.add(ps, _decode_params(outs))
            assert dec.run(len(ps)) == want
            assert dec.computed == len(ps) * MAX_NEW  # only each last prompt token and the decode steps
            assert dec.worker.stats.num_loaded == len(ps) and dec.worker.stats.num_failed == 0
            fetching = dec.worker.transport.agent(serving=False)
            assert fetching.regions.num_registered == 1 and fetching.num_staged_bytes == 0
            assert dec.free_blocks() == (dec.free_blocks()[1],) * 2
        finally:
            dec.close()
        serving = side.transport.agent(serving=True)
        # Each fetch staged exactly its request's rows out of the cache once (then the hold ended); none registered.
        assert serving.regions.num_registered == 0 and len({t.transfer_id for t in copies}) == len(copies) == len(ps)
        c = side.store.counters
        assert (c.num_held, c.num_served, c.num_hold_expired, len(side.store)) == (len(ps), len(ps), 0, 0)
        settle(pre)  # its steps report the holds the reads ended
        assert _free(pre) == (total, total)
        kv_stats = pre.engine.stats().kv_transfer  # metrics: moelink_kv_transfer_holds_ended / _held_blocks
        assert (kv_stats.holds_read, kv_stats.holds_unread, kv_stats.held_blocks) == (len(ps), 0, 0)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_hold_past_its_deadline_frees_the_blocks_and_a_late_fetch_recomputes(tiny_model):
    """A decode engine that does not come within nixl_hold_s: the prefill blocks go back (pool whole), and the
    fetch that comes late is refused on the side channel: the decode engine recomputes, within its deadline."""
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=8, n=2, lo=9, hi=17)
    want = one_engine(path, ps)
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="nixl", nixl_hold_s=0.2))
    with LLM(path, kv_connector=conn, **KW) as pre:
        side = pre.engine.executor.runner.plugin("kv_transfer").connector
        outs = pre.generate(ps, SAVE, use_tqdm=False)
        total = _free(pre)[1]
        # The server's sweeper expires holds while the engine is idle (every ServerLimits.sweep_s).
        assert pre.engine.stats().kv_transfer.held_blocks == total - _free(pre)[0] > 0
        wait_until(lambda: side.store.counters.num_hold_expired == len(ps), 30.0, "the holds to expire")
        settle(pre)
        assert _free(pre) == (total, total) and len(side.store) == 0
        kv_stats = pre.engine.stats().kv_transfer
        assert (kv_stats.holds_read, kv_stats.holds_unread, kv_stats.held_blocks) == (0, len(ps), 0)
        dec = Decoder(path, RemoteKVConfig(transport="nixl", fetch_timeout_s=20.0))
        try:
            dec.add(ps, _decode_params(outs))
            assert dec.run(len(ps)) == want
            stats = dec.worker.stats
            assert stats.num_failed == len(ps) and all("refused" in r for _, r in stats.failures)
            assert dec.free_blocks() == (dec.free_blocks()[1],) * 2
        finally:
            dec.close()


@pytest.fixture()
def held():
    """A prefill transport (the deployment secret) serving a store that holds blocks 2, 3, 4 of a three-layer
    cache in place under "k" (transfer id 7); the decode side's transport."""
    g = torch.Generator().manual_seed(0)
    src = [tuple(torch.randn(6, 4, 2, 8, generator=g) for _ in range(2)) for _ in range(3)]
    pre = make_transport("nixl", 5.0, 20.0, auth=SecretAuth(SECRET))
    store, port = SavedKVStore(60.0, 1 << 30), free_port()
    server = pre.serve(store, "127.0.0.1", port)
    region = pre.hold_region(PagedKVBlocks(src, None, 4))
    assert pre.agent(serving=True).regions.num_registered == 0  # nothing of the cache registered
    store.hold("k", region.held(KVTransfer(7, "k", [2, 3, 4], 10, token_ids=tuple(TOKENS))), 60.0, UNBOUNDED)
    dec = make_transport("nixl", 5.0, 20.0, auth=SecretAuth(SECRET))
    yield src, region, store, port, dec
    server.close()
    pre.close()
    dec.close()


def test_a_fetch_reads_exactly_the_held_blocks_into_its_own_and_ends_the_hold(held):
    src, region, store, port, dec = held
    dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
    kv = PagedKVBlocks(dst, None, 4)
    load = KVTransfer(2, "k", [1, 0, 5], 10)
    writer = ArrivalWriter(load, kv, 0, lambda: 0, threading.Lock())
    dec.fetch("127.0.0.1", port, "k", kv.layout, TOKENS, 3, 20.0, torch.device("cpu"), on_group=writer)
    assert all(torch.equal(d[[1, 0, 5]], s[[2, 3, 4]]) for sl, dl in zip(src, dst) for s, d in zip(sl, dl))
    assert all(not d[[2, 3, 4]].any() for dl in dst for d in dl)  # nothing but the load's blocks written
    agent = dec.agent(serving=False)
    assert agent.num_staged_bytes == 0 and agent.regions.num_registered == 1
    assert writer.nbytes == 3 * sum(x[0].numel() * x.element_size() for layer in src for x in layer)
    assert store.released() == [7] and len(store) == 0  # the hold ended with the read
    # A reader that does not write into a cache (no connector) gets host rows, counted as staged.
    store.hold("k", region.held(KVTransfer(8, "k", [2, 3, 4], 10, token_ids=tuple(TOKENS))), 60.0, UNBOUNDED)
    got = dec.fetch("127.0.0.1", port, "k", kv.layout, TOKENS, 3, 20.0, torch.device("cpu"))
    assert all(torch.equal(r.view(s.dtype), s[[2, 3, 4]]) for (_, rows), sl in zip(got.groups, src)
               for r, s in zip(rows, sl))
    assert agent.num_staged_bytes == sum(r.numel() for _, rows in got.groups for r in rows)
    assert store.released() == [8]


def test_an_unauthenticated_or_wrong_prompt_fetch_gets_no_descriptor(held):
    """A wrong secret, no handshake, the right secret with another prompt: refused on the side channel, no
    address or metadata sent, and the hold stays for the request it was saved for."""
    _, _, store, port, _ = held
    layout = store.layout
    stranger = make_transport("nixl", 5.0, 20.0, auth=SecretAuth(b"y" * 32))
    with pytest.raises(KVFetchError):
        stranger.fetch("127.0.0.1", port, "k", layout, TOKENS, 3, 5.0, torch.device("cpu"))
    stranger.close()
    answer = request_without_handshake(port)
    assert b"tables" not in answer and b"meta" not in answer
    friend = make_transport("nixl", 5.0, 20.0, auth=SecretAuth(SECRET))
    with pytest.raises(KVFetchError, match="refused"):
        friend.fetch("127.0.0.1", port, "k", layout, TOKENS[:-1] + [99], 3, 5.0, torch.device("cpu"))
    friend.close()
    assert len(store) == 1 and store.released() == []


def test_the_worker_halves_hold_a_save_until_the_decode_side_read_it():
    """RemoteWorkerSide over NIXL in place: the save is not reported (its blocks stay the scheduler's) until the
    decode half's load has READ them, then the prefill poll reports it; the bytes exact, nothing staged."""
    from moelink.engine.kv_transfer.config import RemoteSource
    from moelink.engine.kv_transfer.auth import new_capability
    from moelink.engine.kv_transfer.remote import RemoteWorkerSide

    cap, port = new_capability(), free_port()
    prefill = RemoteWorkerSide(RemoteKVConfig(port=port, transport="nixl", secret=SECRET, nixl_hold_fraction=1.0,
                                              nixl_hold_client_fraction=1.0), 0)  # a 12-block cache: hold any
    decode = RemoteWorkerSide(RemoteKVConfig(fetch_timeout_s=10.0, transport="nixl", secret=SECRET), 0)
    try:
        src = [tuple(torch.randn(6, 4, 2, 8) for _ in range(2)) for _ in range(2)]
        prefill.start_save(KVTransfer(1, "req", [3, 1], 8, token_ids=tuple(range(8)), params=cap),
                           PagedKVBlocks(src, None, 4))
        assert prefill.poll() is None and prefill.store.counters.num_held == 1
        dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
        t = KVTransfer(5, "req", [2, 4], 8, params=RemoteSource("127.0.0.1", port, 1, cap, tuple(range(8))))
        decode.start_load(t, PagedKVBlocks(dst, None, 4))
        for th in list(decode._fetches):
            th.join(10)
        assert decode.poll() == {5: True} and decode.stats.num_failed == 0
        assert all(torch.equal(d[[2, 4]], s[[3, 1]]) for sl, dl in zip(src, dst) for s, d in zip(sl, dl))
        assert decode.transport.agent(serving=False).num_staged_bytes == 0
        wait_until(lambda: prefill.poll() == {1: True}, 10.0, "the prefill half to report the hold over")
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_a_long_prompts_reply_header_passes_the_fixed_header_bound(transport):
    """The ok reply's header lists every group's block entries (and in place each table's block ids): 64 layers of
    1,100 blocks is ~350 KB of it, past the fixed 64 KiB bound, and bounded instead by what was asked."""
    src = [(torch.randn(1100, 1, 1, 2),) for _ in range(64)]
    kv = PagedKVBlocks(src, None, 1)
    tokens = list(range(1100))
    t = KVTransfer(3, "k", list(range(1100)), 1100, token_ids=tuple(tokens))
    pre = make_transport(transport, 5.0, 30.0)
    store, port = SavedKVStore(60.0, 1 << 30), free_port()
    server = pre.serve(store, "127.0.0.1", port)
    dec = make_transport(transport, 5.0, 30.0)
    try:
        if transport == "nixl":
            store.hold("k", pre.hold_region(kv).held(t), 60.0, UNBOUNDED)
        else:
            store.put("k", kv.read(t))
        got = dec.fetch("127.0.0.1", port, "k", kv.layout, tokens, 1100, 30.0, torch.device("cpu"))
        assert all(torch.equal(rows[0].view(s[0].dtype), s[0]) for (_, rows), s in zip(got.groups, src))
    finally:
        server.close()
        pre.close()
        dec.close()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_an_aborted_prefill_and_a_shutdown_leave_no_block_held(tiny_model):
    """A prefill request aborted after its save: its own blocks go back at once, the save's stay held until the hold
    ends (nobody fetches: it expires), then the pool is whole; an engine shut down with holds drops them all and
    deregisters its cache (its agents closed)."""
    from moelink.engine.kv_transfer.nixl import open_agents

    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=9, n=2, lo=9, hi=17)
    longer = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                            kv_transfer_params=KVTransferParams(do_remote_decode=True))
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="nixl", nixl_hold_s=0.5, secret=SECRET))
    with LLM(path, kv_connector=conn, **KW) as pre:
        side = pre.engine.executor.runner.plugin("kv_transfer").connector
        total = _free(pre)[1]
        pre.engine.add_request("a0", ps[0], longer)
        while side.store.counters.num_held == 0:  # until the step that computes its prompt has saved it
            pre.engine.step()
        pre.engine.abort_requests(["a0"])
        while pre.engine.has_requests():
            pre.engine.step()
        assert _free(pre)[0] < total  # the save's blocks, held
        wait_until(lambda: side.store.counters.num_hold_expired == 1, 30.0, "the hold to expire")
        settle(pre)
        assert _free(pre) == (total, total)
        pre.generate(ps[1:], SAVE, use_tqdm=False)  # held at shutdown
        assert len(side.store) == 1
        agents = [side.transport.agent(serving=True)]
    assert len(side.store) == 0 and not any(a in open_agents() for a in agents)


def test_a_decode_cache_is_registered_when_allocated_once_and_a_prefill_cache_never():
    """`register_at_allocation` (a loading rank's cache as it is allocated): registered with the fetching agent
    before any fetch, once; a cache allocated again replaces the old registration; a prefill rank (kv_producer)
    registers nothing, with either agent; not NIXL, nothing."""
    from moelink.engine.kv_transfer.nixl_inplace import register_at_allocation
    from moelink.engine.kv_transfer.remote import RemoteWorkerSide

    def cache():
        return PagedKVBlocks([tuple(torch.zeros(6, 4, 2, 8) for _ in range(2)) for _ in range(3)], None, 4)

    dec = make_transport("nixl", 5.0, 20.0)
    prefill = RemoteWorkerSide(RemoteKVConfig(port=free_port(), transport="nixl"), 0, loads=False)
    try:
        kv = cache()
        region = register_at_allocation(dec, kv)
        fetching = dec.agent(serving=False)
        assert region is not None and fetching.regions.num_registered == 1
        assert fetching.regions.get(fetching, kv) is region and fetching.regions.num_registered == 1  # no second
        again = cache()  # e.g. after an elastic recovery
        assert register_at_allocation(dec, again) is not region
        live = fetching.regions.take_all()  # the old cache's registration is gone, the new one's stays
        assert fetching.regions.num_registered == 2 and [r.kv for r in live] == [again]
        fetching.unexpose(live[0].reg)
        assert register_at_allocation(make_transport("tcp", 5.0, 20.0), cache()) is None
        prefill.cache_allocated(cache())
        assert prefill.transport.agent(serving=True).regions.num_registered == 0 and not prefill.transport._agents \
            .get(False)
    finally:
        dec.close()
        prefill.close()
