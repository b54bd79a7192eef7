"""The remote connector's asynchronous save and its layer-pipelined load (engine/kv_transfer/arrival.py,
engine/contract/kv_blocks.py's read_async and wide copies, kv_wire.Staging): a save whose bytes are still on their
way is announced and served once they are there; a load writes each group into the blocks as it arrives, from
memory reused group after group; a rewind while a load arrives writes nothing more."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from moelink.engine.kv_transfer.arrival import ArrivalWriter, LoadDropped
from moelink.engine.kv_transfer.auth import SecretAuth
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteSource, RemoteWorkerSide
from moelink.engine.kv_transfer.store import SavedKVStore
from moelink.engine.kv_transfer.transport import make_transport
from moelink.engine.kv_transfer.wire import KVFetchError
from moelink.engine.contract.kv_blocks import PagedKVBlocks, PendingRead
from moelink.scheduler.outputs import KVTransfer

from tests.helpers.kv_params import CAP, NO_KV, SECRET
from tests.helpers.net import free_port


def _cache(num_layers: int, width: int, dtype=torch.float32, blocks: int = 6):
    """Per layer (k, v) [blocks, B=4, 2 heads, width], random."""
    g = torch.Generator().manual_seed(width)
    return [tuple(torch.randn(blocks, 4, 2, width, generator=g).to(dtype) for _ in range(2)) for _ in range(num_layers)]


@pytest.mark.parametrize("width,dtype", [(8, torch.float32), (3, torch.float16), (5, torch.uint8),
                                         (6, torch.bfloat16)])
def test_block_rows_round_trip_at_every_element_width(width, dtype):
    """Rows are gathered and written as the widest integers their byte width allows (8, 4, 2 or 1 bytes):
    the bytes land exactly, at any row width and dtype, only in the blocks named."""
    src = _cache(2, width, dtype)
    if dtype == torch.uint8:
        src = [tuple((x * 40).to(torch.uint8) for x in layer) for layer in _cache(2, width)]
    dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
    read_t = KVTransfer(1, "r", [4, 1, 2], 12, token_ids=tuple(range(12)))
    saved = PagedKVBlocks(src, None, 4).read_async(read_t)
    assert saved.done()
    write_t = KVTransfer(2, "r", [0, 5, 3], 12)
    PagedKVBlocks(dst, None, 4).write(write_t, saved.saved)
    for s_layer, d_layer in zip(src, dst):
        for s, d in zip(s_layer, d_layer):
            assert torch.equal(d[[0, 5, 3]].view(torch.uint8), s[[4, 1, 2]].view(torch.uint8))
            assert not d[[1, 2, 4]].view(torch.uint8).any()


def test_a_fetch_waits_for_a_save_that_has_begun_and_not_for_one_abandoned():
    """A request's output can name its key before the async save's bytes are in the store: the server waits for
    the announced save (within its own silence limit), and answers at once when the save is abandoned."""
    port = free_port()
    store = SavedKVStore(60.0, 1 << 30)
    transport = make_transport("tcp", 2.0, 10.0)
    server = transport.serve(store, "127.0.0.1", port)
    src = _cache(1, 8)
    saved = PagedKVBlocks(src, None, 4).read(KVTransfer(1, "k", [0, 1], 6, token_ids=tuple(range(6))))
    try:
        store.expect("k")
        threading.Timer(0.5, store.put, ("k", saved)).start()
        t0 = time.monotonic()
        got = transport.fetch("127.0.0.1", port, "k", saved.layout, list(range(6)), 2, 10.0, torch.device("cpu"))
        assert time.monotonic() - t0 >= 0.4 and got.nbytes == saved.nbytes
        store.expect("gone")
        threading.Timer(0.3, store.abandon, ("gone",)).start()
        t0 = time.monotonic()
        with pytest.raises(KVFetchError, match=NO_KV):
            transport.fetch("127.0.0.1", port, "gone", saved.layout, list(range(6)), 2, 10.0, torch.device("cpu"))
        assert time.monotonic() - t0 < 5.0
    finally:
        server.close()


class _SlowRead:
    """A PagedKVBlocks whose read_async finishes when the test says (a GPU copy still in flight)."""

    def __init__(self, blocks: PagedKVBlocks) -> None:
        self.blocks, self.finished = blocks, False

    def read_async(self, t):
        pending = PendingRead(self.blocks.read(t))
        outer = self
        pending.done = lambda: outer.finished
        return pending


def test_an_async_save_is_stored_and_reported_by_the_poll_that_finds_it_done():
    side = RemoteWorkerSide(RemoteKVConfig(port=free_port()), 0)
    try:
        slow = _SlowRead(PagedKVBlocks(_cache(2, 8), None, 4))
        t = KVTransfer(7, "req", [0, 1], 6, token_ids=tuple(range(6)), params=CAP)  # saved under its capability
        side.start_save(t, slow)
        assert side.poll() is None and len(side.store) == 0  # bytes not there yet: the blocks stay held
        slow.finished = True
        assert side.poll() == {7: True} and side.store.peek(CAP).nbytes == 2 * 2 * 2 * 4 * 2 * 8 * 4
    finally:
        side.close()


@pytest.mark.parametrize("transport", ["tcp", "shm", "collective", "nixl"])
def test_a_load_writes_each_group_as_it_arrives_from_reused_memory(transport):
    """Every transport hands the groups over in order; tcp and shm receive each into the same host memory
    (one layer's bytes held at a time), nixl (a peer the deployment secret authenticated: else the bytes come on
    the socket, as tcp's) reads every group at once into one registered buffer, and the blocks end up exactly the
    prefill rank's."""
    port = free_port()
    tr = make_transport(transport, 5.0, 20.0, auth=SecretAuth(SECRET) if transport == "nixl" else None)
    store = SavedKVStore(60.0, 1 << 30)
    server = tr.serve(store, "127.0.0.1", port)
    src = _cache(3, 8)
    saved = PagedKVBlocks(src, None, 4).read(KVTransfer(1, "k", [2, 3, 4], 10, token_ids=tuple(range(10))))
    dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
    blocks = PagedKVBlocks(dst, None, 4)
    load = KVTransfer(2, "k", [1, 0, 5], 10)
    seen = []

    def on_group(g, idx, rows):
        seen.append((g, rows[0].data_ptr()))
        blocks.write_group(g, load, idx, rows)

    try:
        store.put("k", saved)
        got = tr.fetch("127.0.0.1", port, "k", blocks.layout, list(range(10)), 3, 20.0, torch.device("cpu"),
                       on_group=on_group)
        assert [g for g, _ in seen] == [0, 1, 2] and got.nbytes == 0  # handed over, not kept
        if transport in ("tcp", "shm"):
            assert len({p for _, p in seen}) == 1  # the same staging memory each group
        if transport == "nixl":  # one registered buffer, each group's READ into its own part of it (posted at once)
            assert len({p for _, p in seen}) == 3
        for s_layer, d_layer in zip(src, dst):
            for s, d in zip(s_layer, d_layer):
                assert torch.equal(d[[1, 0, 5]], s[[2, 3, 4]])
    finally:
        server.close()


def test_a_rewind_while_a_load_arrives_stops_its_writes():
    """drop_pending moves the generation under the write lock: a group arriving after it raises LoadDropped
    and writes nothing."""
    dst = _cache(2, 8)
    before = [tuple(x.clone() for x in layer) for layer in dst]
    blocks = PagedKVBlocks(dst, None, 4)
    generation = [0]
    lock = threading.Lock()
    writer = ArrivalWriter(KVTransfer(1, "r", [0], 4), blocks, 0, lambda: generation[0], lock)
    rows = tuple(torch.ones(1, 4, 2, 32, dtype=torch.uint8) for _ in range(2))
    writer(0, [0], rows)
    assert writer.nbytes == 512 and writer.done()
    with lock:
        generation[0] += 1
    with pytest.raises(LoadDropped):
        writer(1, [0], rows)
    assert torch.equal(dst[1][0], before[1][0]) and not torch.equal(dst[0][0], before[0][0])


def test_the_remote_side_loads_from_a_prefill_rank_end_to_end():
    """The worker halves of both roles over tcp: save (async form, done at once on CPU), then a load written on
    arrival and reported by the next poll, bytes exact."""
    port = free_port()
    # tcp as the docstring says (the default, nixl, holds the blocks in place: tests/engine/test_kv_nixl_inplace.py)
    prefill = RemoteWorkerSide(RemoteKVConfig(port=port, transport="tcp"), 0)
    decode = RemoteWorkerSide(RemoteKVConfig(fetch_timeout_s=10.0, transport="tcp"), 0)
    try:
        src = _cache(2, 8)
        prefill.start_save(KVTransfer(1, "req", [3, 1], 8, token_ids=tuple(range(8)), params=CAP),
                           PagedKVBlocks(src, None, 4))
        assert prefill.poll() == {1: True}
        dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
        t = KVTransfer(5, "req", [2, 4], 8, params=RemoteSource("127.0.0.1", port, 1, CAP, tuple(range(8))))
        decode.start_load(t, PagedKVBlocks(dst, None, 4))
        for th in list(decode._fetches):
            th.join(10)
        assert decode.poll() == {5: True} and decode.stats.bytes_loaded == 2 * 2 * 2 * 4 * 2 * 8 * 4
        for s_layer, d_layer in zip(src, dst):
            for s, d in zip(s_layer, d_layer):
                assert torch.equal(d[[2, 4]], s[[3, 1]])
    finally:
        prefill.close()
        decode.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_save_copies_on_a_side_stream_and_the_load_lands_exactly():
    """read_async gathers and copies to pinned memory on its own stream, after the work already enqueued on the
    rank's stream (a kernel that writes the cache just before); the arrival writer copies back on its stream."""
    src = [tuple(torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)) for _ in range(4)]
    for layer in src:
        for x in layer:
            x.normal_()  # enqueued on the current stream: the side stream must wait for it
    t = KVTransfer(1, "r", list(range(5, 37)), 512, token_ids=tuple(range(512)))
    pending = PagedKVBlocks(src, None, 16).read_async(t)
    while not pending.done():
        time.sleep(0.0005)
    saved = pending.saved
    assert all(r.is_pinned() for _, rows in saved.groups for r in rows)
    dst = [tuple(torch.zeros_like(x) for x in layer) for layer in src]
    blocks = PagedKVBlocks(dst, None, 16)
    load = KVTransfer(2, "r", list(range(32, 64)), 512)
    writer = ArrivalWriter(load, blocks, 0, lambda: 0, threading.Lock())
    for g, (idx, rows) in enumerate(saved.groups):
        writer(g, idx, rows)
    while not writer.done():
        time.sleep(0.0005)
    for s_layer, d_layer in zip(src, dst):
        for s, d in zip(s_layer, d_layer):
            assert torch.equal(d[32:64], s[5:37])


def test_the_shared_memory_server_reuses_its_files_once_each_client_has_hung_up(monkeypatch):
    """A file is handed to the next reply only after its client closed the connection (all its reads done), so a
    second fetch writes into pages allocated once; the pool's files are closed with the server."""
    import os

    made = []
    real = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda *a: made.append(real(*a)) or made[-1])
    port = free_port()
    tr = make_transport("shm", 5.0, 20.0)
    store = SavedKVStore(60.0, 1 << 30)
    server = tr.serve(store, "127.0.0.1", port)
    src = _cache(2, 8)
    saved = PagedKVBlocks(src, None, 4).read(KVTransfer(1, "k", [0, 1], 6, token_ids=tuple(range(6))))
    try:
        for i in range(3):
            store.put(f"k{i}", saved)
            got = tr.fetch("127.0.0.1", port, f"k{i}", saved.layout, list(range(6)), 2, 20.0, torch.device("cpu"))
            assert all(torch.equal(a, b) for (_, ra), (_, rb) in zip(got.groups, saved.groups) for a, b in zip(ra, rb))
            deadline = time.monotonic() + 5  # the server's thread sees the hang-up and returns the file to the pool
            while server._conns and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(made) == 1  # one file, reused by the second and third replies
    finally:
        server.close()
    for fd in made:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
