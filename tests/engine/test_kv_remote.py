"""The remote KV connector's parts (engine/kv_transfer/remote.py and what it uses): validated parameters and
config, the prefill side's bounded store, the wire's checks against a wrong or hostile peer, the TCP server's
binding and its clean close, and two engines of one process over TCP for what needs no second process (a
layout mismatch named in words, the store bounded by TTL and by bytes). The separate-process runs and faults
are in test_kv_disagg_processes.py."""
from __future__ import annotations

import os
import pickle
import socket
import stat
import threading

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector, RemoteSource
from moelink.engine.kv_transfer.store import SavedKVStore
from moelink.engine.kv_transfer.tcp import TCPKVServer, tcp_fetch
from moelink.engine.kv_transfer.wire import VERSION, KVFetchError, layout_to_json, send_header
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.contract.kv_blocks import SavedKV, layout_difference

from tests.helpers.kv_params import CAP, NO_KV, decode_kv
from tests.helpers.net import free_port, listening
from tests.helpers.parity import prompts

KW = dict(dtype="float64", num_kv_blocks=96, block_size=4, max_num_batched_tokens=32, max_model_len=128,
          skip_warmup=True)
SAVE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                      kv_transfer_params=KVTransferParams(do_remote_decode=True))
LAYOUT = (("full", (("torch.float32", (4, 2, 8)), ("torch.float32", (4, 2, 8)))),)  # GQA: k, v; B=4, 2 heads x 8


def _saved(num_blocks=2, tokens=(1, 2, 3, 4, 5)) -> SavedKV:
    rows = tuple(torch.arange(num_blocks * 4 * 2 * 32, dtype=torch.int64).to(torch.uint8).view(num_blocks, 4, 2, 32)
                 for _ in range(2))
    return SavedKV(len(tokens), tuple(tokens), LAYOUT, [(list(range(num_blocks)), rows)])


# ------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kw,field", [
    (dict(do_remote_prefill=True, remote_port=5000, remote_kv_token=CAP), "remote_host"),
    (decode_kv(host="../tmp/x"), "remote_host"),
    (decode_kv(port=0), "remote_port"),
    (decode_kv(port=65535, ranks=2), "remote_port"),
    (dict(do_remote_prefill=True, remote_host="h", remote_port=5000), "remote_kv_token"),
    (decode_kv(token="p0"), "remote_kv_token"),
    (dict(do_remote_prefill=True, do_remote_decode=True), "do_remote_prefill"),
    (dict(do_remote_decode=1), "do_remote_decode"),
    (dict(remote_ranks=0), "remote_ranks"),
])
def test_kv_transfer_params_name_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=rf"^KVTransferParams\.{field}="):
        KVTransferParams(**kw)


def test_sampling_params_take_kv_transfer_params_typed_or_as_vllm_dicts():
    d = decode_kv(remote_request_id="p0")
    assert SamplingParams(kv_transfer_params=d).kv_transfer_params == KVTransferParams(**d)
    # vLLM's NixlConnector keys moelink has no use for are accepted and ignored (a vLLM router's object); others
    # are refused.
    vllm_style = dict(d, remote_block_ids=[1], remote_engine_id="e", tp_size=1, remote_num_tokens=None)
    assert SamplingParams(kv_transfer_params=vllm_style).kv_transfer_params == KVTransferParams(**d)
    with pytest.raises(ValueError, match="unknown keys.*bootstrap_room"):
        SamplingParams(kv_transfer_params=dict(d, bootstrap_room=7))
    with pytest.raises(ValueError, match=r"SamplingParams\.kv_transfer_params="):
        SamplingParams(kv_transfer_params="p0")
    # A multimodal save's item hashes (docs/multimodal.md): a JSON array in, the same array out; sha256 hex only.
    h = "ab" * 32
    got = KVTransferParams.from_dict(dict(d, mm_hashes=[h, h]))
    assert got.mm_hashes == (h, h) and got.to_dict()["mm_hashes"] == [h, h]
    for bad in ([], ["AB" * 32], ["ab" * 31], [h] * 129, h, [7]):
        with pytest.raises(ValueError, match=r"^KVTransferParams\.mm_hashes="):
            KVTransferParams.from_dict(dict(d, mm_hashes=bad))
    with pytest.raises(ValueError, match=r"mm_hashes=.* only with do_remote_prefill"):
        KVTransferParams(do_remote_decode=True, mm_hashes=(h,))
    with pytest.raises(ValueError, match=r"SamplingParams\.n=2 .*kv_transfer_params"):
        SamplingParams(n=2, kv_transfer_params=d)


@pytest.mark.parametrize("kw,field", [
    (dict(transport="nccl"), "transport"), (dict(port=0), "port"), (dict(port=65535, num_ranks=2), "port"),
    (dict(num_ranks=0), "num_ranks"), (dict(ttl_s=0), "ttl_s"), (dict(fetch_timeout_s=float("inf")), "fetch_timeout_s"),
    (dict(max_saved_bytes=0), "max_saved_bytes"), (dict(host=""), "host"),
])
def test_remote_kv_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=rf"^RemoteKVConfig\.{field}="):
        RemoteKVConfig(**kw)


def test_the_factory_pickles_as_its_config_and_checks_ranks():
    conn = RemoteKVConnector(RemoteKVConfig(port=5000, num_ranks=2))
    assert pickle.loads(pickle.dumps(conn)).config == conn.config  # what a Ray rank gets: addresses, no sockets
    src = RemoteSource("127.0.0.1", 5000, 2, "p0", (1, 2))
    assert pickle.loads(pickle.dumps(src)) == src
    with pytest.raises(ValueError, match=r"num_ranks=2 is too small: rank 2"):
        conn.worker_side(2)
    saved = KVTransferParams(**decode_kv(port=5001, remote_request_id="p0"))  # what rank 1's output says
    with pytest.raises(ValueError, match=r"RemoteKVConfig.port=None"):
        RemoteKVConnector().decode_params(saved)
    assert conn.decode_params(saved) == KVTransferParams(**decode_kv(port=5000, ranks=2, remote_request_id="p0"))


# ------------------------------------------------------------------------------------------- the store
def test_store_drops_on_fetch_after_ttl_and_past_its_bytes():
    now = [0.0]
    one = _saved().nbytes
    store = SavedKVStore(ttl_s=10.0, max_bytes=2 * one, clock=lambda: now[0])
    for i in range(3):  # the third pushes the first out
        store.put(f"r{i}", _saved())
        now[0] += 1.0
    assert len(store) == 2 and store.nbytes == 2 * one and store.counters.num_evicted == 1
    assert store.peek("r0") is None
    s1 = store.peek("r1")
    assert store.take("r1", s1) and not store.take("r1", s1)  # served once
    assert len(store) == 1 and store.counters.num_served == 1 and store.counters.bytes_served == one
    now[0] += 10.0  # r2 was saved at t=2: past its TTL at t=13
    store.expire()
    assert len(store) == 0 and store.nbytes == 0 and store.counters.num_expired == 1
    store.put("r3", _saved())
    store.put("big", _saved(num_blocks=5))  # alone past max_bytes (2.5 entries): never held, r3 kept
    assert len(store) == 1 and store.peek("r3") is not None and store.counters.num_evicted == 2
    store.put("r3", _saved())
    assert len(store) == 1 and store.counters.num_replaced == 1 and store.nbytes == one


def test_layout_differences_in_words():
    other = lambda row, dt="torch.float32": (("full", ((dt, row), (dt, row))),)  # noqa: E731
    assert layout_difference(LAYOUT, LAYOUT) is None
    assert layout_difference(LAYOUT, other((8, 2, 8))) == "block size 4 vs 8"
    assert layout_difference(LAYOUT, other((4, 2, 8), "torch.bfloat16")) == "KV cache dtype torch.float32 vs torch.bfloat16"
    assert "(2, 8) vs (4, 8)" in layout_difference(LAYOUT, other((4, 4, 8)))
    assert "another KV kind" in layout_difference(LAYOUT, (("full", (("torch.float32", (4, 40)),)),))
    assert "2 vs 1 cache groups" in layout_difference(LAYOUT * 2, LAYOUT)


# ------------------------------------------------------------------------------------------- TCP
def test_server_binds_only_where_asked_serves_once_and_closes_clean():
    port = free_port()
    before = {t.ident for t in threading.enumerate()}
    store = SavedKVStore(60.0, 1 << 20)
    server = TCPKVServer(store, "127.0.0.1", port)
    try:
        assert listening(port) == {("127.0.0.1", port)}
        store.put("k", _saved())
        with pytest.raises(KVFetchError, match=NO_KV):
            tcp_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 9], 2, 2.0, 5.0)
        with pytest.raises(KVFetchError, match="block size 4 vs 8"):
            tcp_fetch("127.0.0.1", port, "k", (("full", (("torch.float32", (8, 2, 8)),) * 2),), [1], 1, 2.0, 5.0)
        got = tcp_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 3, 4, 5], 2, 2.0, 5.0)
        want = _saved()
        assert got.token_ids == want.token_ids and got.groups[0][0] == want.groups[0][0]
        assert all(torch.equal(a, b) for a, b in zip(got.groups[0][1], want.groups[0][1]))
        assert len(store) == 0 and store.counters.num_served == 1  # dropped once fetched
        with pytest.raises(KVFetchError, match=NO_KV):
            tcp_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 3, 4, 5], 2, 2.0, 5.0)
        store.put("k", _saved(num_blocks=2))
        with pytest.raises(KVFetchError, match="a reply of 2 blocks"):  # more than asked for: not read
            tcp_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 3, 4, 5], 1, 2.0, 5.0)
    finally:
        server.close()
    assert not listening(port)
    assert {t.ident for t in threading.enumerate()} <= before  # the accept and connection threads ended


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_peer_that_is_not_a_kv_server_fails_the_fetch_in_time():
    from moelink.engine.kv_transfer.wire import recv_header

    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]

        def answer(garbage: bytes | None):
            conn, _ = lsock.accept()
            with conn:
                conn.recv(1 << 16)
                if garbage is not None:
                    conn.sendall(garbage)
                    return
                send_header(conn, {"ok": True, "v": VERSION, "nonce": "00" * 32})  # a handshake (no secret)
                recv_header(conn)  # the request
                send_header(conn, {"ok": True, "num_tokens": 1, "layout": layout_to_json(LAYOUT),
                                   "groups": [[[0], [[1, 4, 2, 32], [1, 4, 2, 32]]]]})
                conn.recv(1 << 16)  # a reply that stops before its bytes: the client's deadline ends it
                conn.recv(1)

        for garbage, match in ((b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad magic"), (None, "timed out")):
            t = threading.Thread(target=answer, args=(garbage,))
            t.start()
            with pytest.raises(KVFetchError, match=match):
                tcp_fetch("127.0.0.1", port, "k", LAYOUT, [1], 1, 2.0, 1.0)
            t.join(10)


# ------------------------------------------------------------------------------------------- two engines here
def _decode(path, ps, params, **kw):
    with LLM(path, kv_connector=RemoteKVConnector(), **{**KW, **kw}) as llm:
        sps = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, kv_transfer_params=p) for p in params]
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, sps, use_tqdm=False)]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        return outs, llm.engine.executor.runner.plugin("kv_transfer").connector.stats


def test_another_block_size_is_refused_by_name_and_recomputed(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=11, n=2, lo=6, hi=10)
    with LLM(path, **KW) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(
            ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)]
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port()))
    with LLM(path, kv_connector=conn, **KW) as pre:
        outs = pre.generate(ps, SAVE, use_tqdm=False)
        params = [o.kv_transfer_params for o in outs]
        assert params == [conn.decode_params(p) for p in params]  # one rank: the same
        store = pre.engine.executor.runner.plugin("kv_transfer").connector.store
        got, stats = _decode(path, ps, params, block_size=8)
        assert got == want and stats.num_failed == len(ps) and stats.num_loaded == 0
        assert all("block size 4 vs 8" in reason for _, reason in stats.failures)
        assert len(store) == len(ps)  # refused, not served: kept for a decode engine that fits, until its TTL


def test_the_prefill_store_stays_bounded_by_ttl_and_bytes(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=12, n=6, lo=8, hi=8)  # two blocks each: every entry the same size
    now = [0.0]
    # The host-copy store's bounds: NIXL in place holds blocks, not bytes (tests/engine/test_kv_nixl_inplace.py).
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), ttl_s=30.0, nixl_in_place=False))
    with LLM(path, kv_connector=conn, **KW) as pre:
        worker = pre.engine.executor.runner.plugin("kv_transfer").connector
        store = worker.store
        store._clock = lambda: now[0]  # the test's clock: no sleeping for a TTL
        pre.generate(ps[:2], SAVE, use_tqdm=False)
        one = store.nbytes // 2
        store.max_bytes = 3 * one
        pre.generate(ps[2:], SAVE, use_tqdm=False)
        assert len(store) == 3 and store.nbytes == 3 * one  # six saved, three held
        assert store.counters.num_saved == 6 and store.counters.num_evicted == 3
        now[0] += 31.0
        pre.generate(ps[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # a step polls: the store expires
        assert len(store) == 0 and store.nbytes == 0 and store.counters.num_expired == 3


def test_a_save_request_on_an_engine_that_serves_nothing_is_not_saved(tiny_model, caplog):
    path = tiny_model("qwen3_e6k3")
    with LLM(path, kv_connector=RemoteKVConnector(), **KW) as llm:
        out = llm.generate(prompts(200, seed=13, n=1, lo=5, hi=5), SAVE, use_tqdm=False)[0]
        assert len(llm.engine.executor.runner.plugin("kv_transfer").connector.store) == 0 and out.kv_transfer_params is None
    assert "RemoteKVConfig.port is None" in caplog.text


def test_kv_transfer_params_on_an_engine_without_a_connector_are_refused(tiny_model):
    with LLM(tiny_model("qwen3_e6k3"), **KW) as llm:
        with pytest.raises(ValueError, match="kv_transfer_params is set, but this engine has no KV connector"):
            llm.engine.add_request("a", [1, 2, 3], SAVE)
        assert not llm.engine.has_requests()


def test_shared_memory_transport_serves_once_refuses_by_name_and_leaves_nothing():
    from moelink.engine.kv_transfer.shm import ShmKVServer, shm_fetch, unix_socket_path

    port = free_port()
    path = unix_socket_path("127.0.0.1", port)
    before = {t.ident for t in threading.enumerate()}
    fds_before = len(os.listdir("/proc/self/fd"))
    store = SavedKVStore(60.0, 1 << 20)
    server = ShmKVServer(store, "127.0.0.1", port)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # this user only
        store.put("k", _saved())
        with pytest.raises(KVFetchError, match="block size 4 vs 8"):
            shm_fetch("127.0.0.1", port, "k", (("full", (("torch.float32", (8, 2, 8)),) * 2),), [1], 1, 5.0)
        got = shm_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 3, 4, 5], 2, 5.0)
        want = _saved()
        assert got.token_ids == want.token_ids and got.groups[0][0] == want.groups[0][0]
        assert all(torch.equal(a, b) for a, b in zip(got.groups[0][1], want.groups[0][1]))
        assert len(store) == 0 and store.counters.num_served == 1
        with pytest.raises(KVFetchError, match=NO_KV):
            shm_fetch("127.0.0.1", port, "k", LAYOUT, [1, 2, 3, 4, 5], 2, 5.0)
    finally:
        server.close()
    assert not os.path.exists(path)
    with pytest.raises(KVFetchError, match="No such file"):
        shm_fetch("127.0.0.1", port, "k", LAYOUT, [1], 1, 5.0)
    assert {t.ident for t in threading.enumerate()} <= before
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # every memfd and socket closed


def test_a_rewind_drops_loads_in_flight_without_writing_them():
    """Elastic EP's rewind counts the transfers in flight failed (scheduler/recovery.py) and the runner calls
    drop_pending: a fetch that arrives afterwards writes nothing (its blocks may be another request's) and is
    never reported."""
    from moelink.engine.kv_transfer.remote import RemoteWorkerSide
    from moelink.engine.contract.kv_blocks import PagedKVBlocks
    from moelink.scheduler.outputs import KVTransfer

    port = free_port()
    prefill = RemoteWorkerSide(RemoteKVConfig(port=port), 0)
    decode = RemoteWorkerSide(RemoteKVConfig(fetch_timeout_s=10.0), 0)
    try:
        cache = [tuple(torch.zeros(5, 4, 2, 8) for _ in range(2))]  # 4 blocks and the null block
        blocks = PagedKVBlocks(cache, None, 4)
        assert blocks.layout == LAYOUT
        src = RemoteSource("127.0.0.1", port, 1, "k", (1, 2, 3, 4, 5))
        for drop in (False, True):
            prefill.store.put("k", _saved())
            t = KVTransfer(1, "r", [0, 1], 5, params=src)
            decode.start_load(t, blocks)
            if drop:
                decode.drop_pending()
            for th in list(decode._fetches):
                th.join(10)
            done = decode.poll()
            written = bool(cache[0][0].count_nonzero())
            assert (done, written) == ((None, False) if drop else ({1: True}, True))
            for x in cache[0]:
                x.zero_()
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("transport", ["tcp", "shm", "collective", "nixl"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_an_fp8_cache_over_each_transport(transport, hf_tiny_model):
    """fp8 KV (GLM-4.5 tiny, kv_cache_dtype="fp8") crosses as bytes: the wire sizes rows by the dtype's itemsize.
    Both engines here; the separate-process runs cover the other KV kinds."""
    path = hf_tiny_model("glm_bias")
    kw = dict(KW, kv_cache_dtype="fp8")
    ps = prompts(200, seed=15, n=3, lo=5, hi=14)
    with LLM(path, **kw) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(
            ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)]
    conn = RemoteKVConnector(RemoteKVConfig(port=free_port(), transport=transport))
    with LLM(path, kv_connector=conn, **kw) as pre:
        outs = pre.generate(ps, SAVE, use_tqdm=False)
        assert "float8" in str(pre.engine.executor.runner.plugin("kv_transfer").connector.store.peek(
            outs[0].kv_transfer_params.remote_kv_token).layout)
        with LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(transport=transport)), **kw) as dec:
            sps = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, kv_transfer_params=o.kv_transfer_params)
                   for o in outs]
            got = [o.outputs[0].token_ids for o in dec.generate(ps, sps, use_tqdm=False)]
            stats = dec.engine.executor.runner.plugin("kv_transfer").connector.stats
    assert got == want and stats.num_loaded == len(ps) and stats.num_failed == 0
    # Both engines shut down: their servers' and fetches' threads are gone, the port or socket file closed.
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("kv-server", "kv-tcp", "kv-fetch"))]
    assert not listening(conn.config.port)
