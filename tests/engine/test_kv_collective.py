"""engine/kv_transfer/collective.py on its own: the bytes over a gloo pair group, the group reused, and a server
process killed after its ok header, mid-transfer: the fetch fails within its deadline with the reason, the
broken group is dropped, and the next fetch from a live server builds a new one."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moelink.engine.kv_transfer import collective as kv_collective
from moelink.engine.kv_transfer.collective import CollectiveKVServer, collective_fetch
from moelink.engine.kv_transfer.store import SavedKVStore
from moelink.engine.kv_transfer.wire import KVFetchError
from moelink.engine.contract.kv_blocks import SavedKV

from tests.helpers import zygote
from tests.helpers.kv_params import NO_KV
from tests.helpers.net import free_port, listening

LAYOUT = (("full", (("torch.float32", (4, 2, 8)), ("torch.float32", (4, 2, 8)))),)


def _saved(num_blocks=3, tokens=(1, 2, 3, 4, 5, 6, 7, 8, 9)) -> SavedKV:
    g = torch.Generator().manual_seed(num_blocks)
    rows = tuple(torch.randint(0, 255, (num_blocks, 4, 2, 32), dtype=torch.uint8, generator=g) for _ in range(2))
    return SavedKV(len(tokens), tuple(tokens), LAYOUT, [(list(range(num_blocks)), rows)])


def test_bytes_over_a_pair_group_reused_and_refusals_make_no_group():
    port = free_port()
    store = SavedKVStore(60.0, 1 << 20)
    server = CollectiveKVServer(store, "127.0.0.1", port)
    try:
        assert listening(port) == {("127.0.0.1", port)}
        with pytest.raises(KVFetchError, match=NO_KV):
            collective_fetch("127.0.0.1", port, "k0", LAYOUT, list(range(1, 10)), 3, 2.0, 10.0)
        for i in range(3):
            want = _saved()
            store.put(f"k{i}", want)
            got = collective_fetch("127.0.0.1", port, f"k{i}", LAYOUT, list(range(1, 10)), 3, 2.0, 10.0)
            assert got.token_ids == want.token_ids and got.groups[0][0] == want.groups[0][0]
            assert all(torch.equal(a, b) for a, b in zip(got.groups[0][1], want.groups[0][1]))
        assert len(store) == 0 and store.counters.num_served == 3
        assert kv_collective._client_pairs.get(("127.0.0.1", port)).group is not None  # built once, reused
    finally:
        server.close()
        kv_collective._client_pairs.drop(("127.0.0.1", port))
    assert not listening(port)


SERVER = textwrap.dedent("""
    import sys, time, torch
    from moelink.engine.kv_transfer import collective as kv_collective
    from moelink.engine.kv_transfer.collective import CollectiveKVServer
    from moelink.engine.kv_transfer.store import SavedKVStore
    from moelink.engine.contract.kv_blocks import SavedKV
    port = int(sys.argv[1])
    layout = (("full", (("torch.float32", (4, 2, 8)), ("torch.float32", (4, 2, 8)))),)
    rows = tuple(torch.zeros((3, 4, 2, 32), dtype=torch.uint8) for _ in range(2))
    store = SavedKVStore(60.0, 1 << 20)
    store.put("k", SavedKV(9, tuple(range(1, 10)), layout, [([0, 1, 2], rows)]))
    real_wait = kv_collective._wait
    def stall(work, deadline, what):  # the header went out, the group is up: stop before any byte
        print("stalled", flush=True)
        time.sleep(600)
    kv_collective._wait = stall
    server = CollectiveKVServer(store, "127.0.0.1", port)
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_server_killed_mid_transfer_fails_the_fetch_in_time_and_drops_the_group():
    port = free_port()
    # Forked by the test zygote (torch imported once: tests/helpers/zygote.py), else exec'd.
    proc = zygote.popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True, fork_code=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import threading

        def kill_when_stalled():
            if proc.stdout.readline().strip() == "stalled":
                proc.kill()

        killer = threading.Thread(target=kill_when_stalled, daemon=True)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(KVFetchError, match=r"fetching KV from 127\.0\.0\.1"):
            collective_fetch("127.0.0.1", port, "k", LAYOUT, list(range(1, 10)), 3, 2.0, 30.0)
        assert time.monotonic() - t0 < 30.0 + 5.0
        assert kv_collective._client_pairs.get(("127.0.0.1", port)) is None  # the broken group is not kept
    finally:
        proc.kill()
        proc.wait(10)
