"""The KV offload tiers (engine/kv_transfer/offload*.py): blocks the device prefix cache evicts go to host memory
(then disk), a prompt whose prefix was evicted loads them back instead of recomputing them, asynchronously (other
requests keep stepping), and greedy outputs equal one engine without offload; an abort while loading frees every
block and slot; the index's LRU, pins and push-downs; the flags and refusals."""
from __future__ import annotations

import argparse
import os

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.engine.kv_transfer.offload_compose import WithOffload
from moelink.engine.kv_transfer.offload_tiers import TierIndex, TierStats
from moelink.scheduler.request import RequestStatus

from tests.helpers.parity import prompts

# 20 blocks of 4 tokens: the device prefix cache holds one 40-token prompt and little else.
KW = dict(dtype="float64", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64, max_model_len=64,
          skip_warmup=True)
BLOCK_BYTES = 2 * 4 * 2 * 16 * 8 * 2  # k and v, B=4, 2 kv heads x 16, float64, x 2 layers (qwen3_e6k3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(llm, ps, params=GREEDY):
    return [(o.outputs[0].token_ids, o.num_cached_tokens) for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def case(tiny_model):
    path = tiny_model("qwen3_e6k3")
    target, *others = prompts(200, seed=31, n=4, lo=40, hi=41)  # 40 tokens each: 10 blocks
    side = prompts(200, seed=32, n=1, lo=6, hi=7)[0]
    with LLM(path, **KW) as llm:
        want = _run(llm, [target])[0][0]
        want_side = _run(llm, [side], LONG)[0][0]
    return path, target, others, want, side, want_side


def _idle(llm, conn):
    """Every device block free and every tier slot unpinned (nothing leaked)."""
    sched = llm.engine.schedulers[0]
    index = conn.tier_index(0)
    index.check()
    return sched.kv.pool.num_free_blocks == KW["num_kv_blocks"] and index.num_pinned() == 0


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_an_evicted_prefix_is_loaded_back_from_its_tier_not_recomputed(case, tier, tmp_path):
    path, target, others, want, _, _ = case
    # "disk": a host tier of 12 blocks, so the target's blocks are pushed down to the file as the others arrive.
    cfg = (OffloadConfig(host_bytes=1 << 30) if tier == "host"
           else OffloadConfig(host_bytes=12 * BLOCK_BYTES, disk_bytes=1 << 30, disk_dir=str(tmp_path / "kv")))
    conn = OffloadKVConnector(cfg)
    with LLM(path, kv_connector=conn, **KW) as llm:
        assert _run(llm, [target]) == [(want, 0)]  # computed; its blocks stay in the device prefix cache
        for p in others:  # each fills the device pool: the target's blocks are evicted, to the host tier
            _run(llm, [p])
        got = _run(llm, [target])
        assert _idle(llm, conn)
        if tier == "disk":
            # One file per rank, unlinked as soon as it was opened: held by its descriptor, never in the directory
            # (a rank that is killed leaves nothing behind).
            assert os.listdir(tmp_path / "kv") == []
            held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                    if os.path.islink(f"/proc/self/fd/{fd}")]
            assert sum(1 for x in held if x.startswith(str(tmp_path / "kv")) and x.endswith("(deleted)")) == 1
    stats = conn.offload_tier_stats()
    assert got == [(want, 39)]  # 10 blocks from below the device; the last prompt token computed for its logits
    assert stats[tier].hits > 0 and stats[tier].loaded_bytes == stats[tier].hits * BLOCK_BYTES
    assert stats["host"].hits + stats["disk"].hits == 10 and stats["host"].stored >= 10
    if tier == "disk":
        assert stats["host"].evicted > 0 and stats["disk"].stored > 0
        assert os.listdir(tmp_path / "kv") == []


def _filling_disk(monkeypatch, rest: str):
    """os.pwritev / os.preadv as a disk tier that is filling up or failing sees them: a slot's first write puts half
    of its bytes down and returns that count with no error (a tmpfs with a few KiB free); what is left of it then
    fails with ENOSPC (`rest="enospc"`), or goes down on the next call (`"progress"`, as after a signal); or
    (`"short-read"`) every write is whole and every read of a slot stops half-way."""
    import errno

    from moelink.engine.kv_transfer import offload_store

    real_write, real_read = os.pwritev, os.preadv

    def pwritev(fd, bufs, offset):
        data = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
        if rest != "short-read" and offset % BLOCK_BYTES == 0:  # a slot's first write: half of it
            return real_write(fd, [data[:len(data) // 2]], offset)
        if rest == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, [data], offset)

    def preadv(fd, bufs, offset):
        if rest != "short-read":
            return real_read(fd, bufs, offset)
        n = real_read(fd, bufs, offset)
        return min(n, BLOCK_BYTES // 2)

    monkeypatch.setattr(offload_store.os, "pwritev", pwritev)
    monkeypatch.setattr(offload_store.os, "preadv", preadv)


@pytest.mark.parametrize("rest", ["enospc", "progress", "short-read"])
def test_a_short_disk_write_or_read_never_serves_the_block(case, rest, tmp_path, monkeypatch):
    """Issue 53: a push-down written short (8 KiB of a 24 KiB slot on a full tmpfs, no error) was later loaded as the
    block. Every write's length is checked: continued while the OS makes progress, else the block is dropped and its
    slot never read; a short read fails the load (recomputed). The tokens are always the engine's without offload."""
    path, target, others, want, _, _ = case
    _filling_disk(monkeypatch, rest)
    conn = OffloadKVConnector(OffloadConfig(host_bytes=12 * BLOCK_BYTES, disk_bytes=1 << 30,
                                            disk_dir=str(tmp_path / "kv")))
    with LLM(path, kv_connector=conn, **KW) as llm:
        _run(llm, [target])
        for p in others:
            _run(llm, [p])
        (got, cached), = _run(llm, [target])
        assert _idle(llm, conn)
    stats = conn.offload_tier_stats()
    assert got == want
    if rest == "progress":  # every write finished on a later call: the blocks come back from disk
        assert cached == 39 and stats["disk"].hits > 0 and stats["disk"].failed == 0
    else:  # never from the disk tier: dropped at the failed write, or the load that read short recomputed
        assert stats["disk"].hits == 0 and stats["disk"].failed > 0, stats


def test_a_disk_slot_whose_write_failed_is_never_read_even_before_the_scheduler_hears(tmp_path, monkeypatch):
    """The worker marks a disk slot whose push-down failed: a load planned before the step's failure reached the
    scheduler (an asynchronous step) fails rather than read it, the step's saves still land, and a slot written
    whole again is read again."""
    import torch

    from moelink.engine.contract.kv_blocks import PagedKVBlocks
    from moelink.engine.kv_transfer.offload_store import TierStore

    kv = PagedKVBlocks([tuple(torch.arange(6 * 64, dtype=torch.float32).view(6, 4, 2, 8) for _ in range(2))], None, 4)
    store = TierStore(kv, OffloadConfig(host_bytes=4 * 512, disk_bytes=4 * 512, disk_dir=str(tmp_path)), 0)
    store.save(kv, [1, 2], [0, 1])
    _filling_disk(monkeypatch, "enospc")
    with pytest.raises(OSError, match="push-down to the disk tier under .* failed: No space left on device"):
        store.demote([(0, 3)])
    with pytest.raises(OSError, match="whose push-down failed"):
        store.promote([(3, 2)])
    monkeypatch.undo()
    store.demote([(1, 3)])  # whole this time: slot 3 holds block 2's bytes
    store.promote([(3, 2)])
    assert torch.equal(store.host_SR[0][2], store.host_SR[0][1])
    store.close()


def _evicted_target(case):
    path, target, others, *_ = case
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    llm = LLM(path, kv_connector=conn, **KW)
    _run(llm, [target])
    for p in others:
        _run(llm, [p])
    return llm, conn


def _step(llm, out):
    for o in llm.engine.step():
        out[o.request_id] = o.outputs[0].token_ids


def test_a_load_runs_while_another_request_decodes_and_an_abort_while_loading_frees_everything(case, gated_load):
    _, target, _, want, side, want_side = case
    gate, landed = gated_load
    llm, conn = _evicted_target(case)
    with llm:
        eng, sched = llm.engine, llm.engine.schedulers[0]
        out: dict[str, list[int]] = {}
        eng.add_request("side", side, LONG)
        _step(llm, out)
        eng.add_request("t", target, GREEDY)
        for _ in range(4):  # the side request decodes while t's blocks are on their way
            _step(llm, out)
        assert sched.requests["t"].status is RequestStatus.WAITING_FOR_KV and len(out["side"]) >= 4
        gate.set()
        assert landed.wait(60)
        while eng.has_requests():
            _step(llm, out)
        assert out["t"] == want and out["side"] == want_side

        # Abort while loading: its blocks and slots come back once the thread is done.
        for p in case[2]:  # the target out again (these load from the tiers themselves: the gate is open)
            _run(llm, [p])
        gate.clear(), landed.clear()
        eng.add_request("t2", target, GREEDY)
        _step(llm, out)
        assert sched.requests["t2"].status is RequestStatus.WAITING_FOR_KV
        eng.abort_requests(["t2"])
        gate.set()
        assert landed.wait(60)
        for _ in range(3):
            _step(llm, out)
        assert _idle(llm, conn) and not eng.has_requests()


def test_the_index_is_lru_within_its_slots_with_pins_and_push_downs():
    ix = TierIndex(2, 2, 10)
    a, b, c, d, e = (bytes([i]) * 32 for i in range(5))
    assert ix.store(a) == 0 and ix.store(b) == 1
    assert ix.store(c) is None  # both host slots are pinned until the step's work is reported
    ix.pin([0, 1], -1)
    assert ix.store(c) == 0 and ix.take_demotes() == ((0, 0),)  # a pushed down to disk slot 0 first
    assert a in ix.disk and c in ix.host and ix.num_leading([c, b, a, d], 0) == 3
    ix.pin([0], -1)
    plan = ix.plan_load([b, a], seq=1)  # a is staged from disk into a host slot (c's: pushed down)
    assert plan.tier == "disk" and plan.promote == ((0, plan.host_slots[1]),) and ix.take_demotes() == ((0, 1),)
    assert ix.store(d) is None  # every host slot is read by the load
    ix.load_ended(plan, [b, a], True, 0.5)
    assert ix.stats["disk"].hits == 1 and ix.stats["host"].hits == 1 and ix.stats["disk"].load_s == 0.5
    ix.check()
    assert ix.store(d) is not None and ix.store(e) is not None  # the disk tier drops its oldest past 2 slots
    assert ix.plan_load([a, bytes(32)], seq=2) is None  # a block left the tiers: nothing pinned
    ix.clear()
    ix.check()
    assert not ix.host and not ix.disk


def test_the_flags_and_the_refusals_each_name_what_is_wrong(tmp_path):
    from moelink.engine.api.kv_args import add_role_args, role_from_args

    p = argparse.ArgumentParser()
    add_role_args(p)

    def role(*argv):
        return role_from_args(p.parse_args(list(argv)), 1)

    conn = role("--kv-offload-host-bytes", "1000", "--kv-offload-disk-bytes", "2000",
                "--kv-offload-dir", str(tmp_path / "d")).connector()
    assert isinstance(conn, OffloadKVConnector) and conn.config.disk_bytes == 2000
    assert role().connector() is None
    with_pd = role("--role", "prefill", "--kv-port", "5600", "--kv-offload-host-bytes", "1000").connector()
    assert isinstance(with_pd, WithOffload) and with_pd.kv_role == "kv_producer"
    assert with_pd.offload.config.host_bytes == 1000
    for argv, msg in [(["--kv-offload-host-bytes", "0"], r"^--kv-offload-host-bytes=0 is invalid"),
                      (["--kv-offload-host-bytes", "9", "--kv-offload-disk-bytes", "-1"], "disk-bytes=-1"),
                      (["--kv-offload-host-bytes", "9", "--kv-offload-disk-bytes", "5"], "needs --kv-offload-dir"),
                      (["--kv-offload-host-bytes", "9", "--kv-offload-dir", "x"], "without --kv-offload-disk-bytes"),
                      (["--kv-offload-disk-bytes", "5"], "without --kv-offload-host-bytes"),
                      (["--kv-offload-host-bytes", "9", "--kv-offload-disk-bytes", "5", "--kv-offload-dir",
                        __file__], "not a directory")]:
        with pytest.raises(ValueError, match=msg):
            role(*argv)
    with pytest.raises(ValueError, match="must hold at least one"):
        OffloadConfig(host_bytes=100).num_slots(4096)

    class StateKV:  # a linear-attention model's cache manager (scheduler/hybrid_cache.py) has state slots
        def state_slot(self, request_id):
            return 0

    with pytest.raises(ValueError, match="keeps a per-sequence state the offload tiers do not key"):
        OffloadKVConnector(OffloadConfig(host_bytes=1)).scheduler_side(0).bind(StateKV())


def test_tier_sizes_past_the_machine_are_refused_at_start_naming_the_flag(tmp_path, monkeypatch):
    """Issue 53: --kv-offload-host-bytes 1e15 (or 2^63-1, 2^64) and --kv-offload-disk-bytes 1e18 started, and the
    first eviction's MemoryError killed the engine loop. Refused when the flags are read (before any weights load),
    one line naming the flag, the value and what is allowed; the Python API's OffloadKVConnector the same; a rank
    whose own machine is smaller turns its offload off instead of dying; and the index allocates nothing per slot."""
    from moelink.engine.api.kv_args import add_role_args, role_from_args
    from moelink.engine.kv_transfer import offload_tiers
    from moelink.engine.kv_transfer.offload_tiers import HOST_MEMORY_SHARE, StepOps
    from moelink.scheduler.outputs import KVTransfer

    p = argparse.ArgumentParser()
    add_role_args(p)

    def role(*argv):
        return role_from_args(p.parse_args(list(argv)), 1)

    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = int(mem * HOST_MEMORY_SHARE)
    for v in (10 ** 15, 2 ** 63 - 1, 2 ** 64, limit + 1):
        with pytest.raises(ValueError, match=rf"^--kv-offload-host-bytes={v} is invalid: more than this machine can "
                                             rf"hold: at most {limit} bytes per rank \(90% of its {mem} bytes of "
                                             r"physical memory\)\.$"):
            role("--kv-offload-host-bytes", str(v))
    where = str(tmp_path / "not-yet" / "kv")  # made at the first step: the free space is its parent's
    with pytest.raises(ValueError, match=rf"^--kv-offload-disk-bytes={10 ** 18} is invalid: more than the disk under "
                                         r"'.*not-yet/kv' has free: at most \d+ bytes"):
        role("--kv-offload-host-bytes", "1000", "--kv-offload-disk-bytes", str(10 ** 18), "--kv-offload-dir", where)
    assert role("--kv-offload-host-bytes", str(limit), "--kv-offload-disk-bytes", str(1 << 20),
                "--kv-offload-dir", where).offload.host_bytes == limit  # nothing is allocated at start
    with pytest.raises(ValueError, match=r"^OffloadConfig\.host_bytes=18446744073709551616 is invalid: more than "
                                         r"this machine can hold.*\(--kv-offload-host-bytes\)\.$"):
        OffloadKVConnector(OffloadConfig(host_bytes=2 ** 64))
    with pytest.raises(ValueError, match=r"^OffloadConfig\.disk_bytes=10+ is invalid: more than the disk"):
        OffloadKVConnector(OffloadConfig(host_bytes=1000, disk_bytes=10 ** 18, disk_dir=where))

    # A rank on a smaller machine than the driver's: its offload is off, with the reason, and the engine lives.
    import torch

    from moelink.engine.contract.kv_blocks import PagedKVBlocks

    side = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20)).worker_side(0)
    monkeypatch.setattr(offload_tiers, "physical_memory_bytes", lambda: 1 << 19)
    side.start_load(KVTransfer(1, "", [], 0, params=StepOps(1, 0)),
                    PagedKVBlocks([tuple(torch.zeros(6, 4, 2, 8) for _ in range(2))], None, 4))
    assert side.poll() == {1: False} and side.store is None
    assert "OffloadConfig.host_bytes=1048576 is invalid: more than this machine can hold" in side._refused

    # The index holds no list of every slot: a count past any machine costs nothing until slots are used.
    ix = TierIndex(2 ** 62, 2 ** 62, 1)
    a, b = bytes(32), bytes([1]) * 32
    assert ix.store(a) == 0 and ix.store(b) == 1
    ix.pin([0, 1], -1)
    ix.drop([a])
    assert ix.store(bytes([2]) * 32) == 0  # a slot given back is taken again first
    ix.check()


def test_the_scheduler_half_stores_what_the_pool_evicts_and_forgets_it_on_a_reset():
    from moelink.scheduler.kv_cache_manager import KVCacheManager
    from moelink.scheduler.kv_connector import KVTransfers
    from moelink.scheduler.request import Request

    conn = OffloadKVConnector(OffloadConfig(host_bytes=4 * 100))
    conn.block_bytes = 100  # 4 host slots
    kv = KVCacheManager(4, 2)
    kvt = KVTransfers(conn.scheduler_side(0), kv)  # binds the half, and the pool starts recording evictions
    a = Request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_blocks(a)  # blocks 0, 1 cached (full); block 2 holds one token
    kv.free(a)
    b = Request("b", [9] * 8)
    kv.allocate_slots(b, 8)  # takes all four blocks (2 and 3 first: nothing cached): 1 and 0 are evicted
    (t,) = kvt.plan({}).loads  # the step's tier work, first among its loads
    assert sorted(t.params.save_blocks) == [0, 1] and len(t.params.save_slots) == 2
    assert conn.tier_index(0).num_pinned() == 2  # until the worker reports the copies done
    kvt.take_report({t.transfer_id: True})
    assert conn.tier_index(0).num_pinned() == 0
    kv.free(b)
    c = Request("c", [1, 2, 3, 4, 5])
    kv.get_computed_blocks(c)
    assert kvt.loadable(c) == 4  # both of a's full blocks, from the host tier
    kv.reset_prefix_cache()
    assert kvt.loadable(c) == 0 and not conn.tier_index(0).host


def test_a_closed_worker_half_reports_its_work_failed_instead_of_running_it():
    """A rank whose runner is kept through an elastic regroup keeps its closed worker half: a step's tier work and a
    load are then reported failed (the scheduler drops those keys, the request is recomputed), never run."""
    from moelink.engine.kv_transfer.offload_tiers import LoadPlan, StepOps
    from moelink.scheduler.outputs import KVTransfer

    side = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20)).worker_side(0)
    side.close()
    ops = KVTransfer(1, "", [], 0, params=StepOps(1, 64))
    load = KVTransfer(2, "r", [5], 4, params=LoadPlan(2, (0,)))
    side.start_load(ops, None)
    side.start_load(load, None)
    assert side.poll() == {1: False, 2: False}


def test_a_disk_tier_that_cannot_be_made_turns_offload_off_once(tmp_path):
    """A disk tier whose directory cannot be made (here: a regular file in the way) turns the rank's offload off once,
    with the reason, and every later step's tier work is reported failed without allocating the tiers again; a
    file an earlier process left under the same directory never blocks a new one (mkstemp names)."""
    import torch

    from moelink.engine.contract.kv_blocks import PagedKVBlocks
    from moelink.engine.kv_transfer.offload_tiers import StepOps
    from moelink.scheduler.outputs import KVTransfer

    kv = PagedKVBlocks([tuple(torch.zeros(6, 4, 2, 8) for _ in range(2))], None, 4)
    (tmp_path / "in-the-way").write_text("")
    side = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20, disk_bytes=1 << 20,
                                            disk_dir=str(tmp_path / "in-the-way" / "kv"))).worker_side(0)
    for tid in (1, 2):
        side.start_load(KVTransfer(tid, "", [], 0, params=StepOps(tid, 0)), kv)
    assert side.poll() == {1: False, 2: False} and side.store is None
    assert side._refused.startswith("offload is off: ")
    ok = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=str(tmp_path)))
    (tmp_path / f"moelink-kv-{os.getpid()}-rank0.bin").write_text("left by an earlier process")
    good = ok.worker_side(0)
    good.start_load(KVTransfer(3, "", [], 0, params=StepOps(3, 0)), kv)
    assert good.poll() == {3: True} and good.store is not None and good.store.num_disk > 0
    good.close()


def test_an_elastic_regroup_keeps_only_the_live_schedulers_tier_counters():
    """engine/cluster/elastic.py hands the connector its live scheduler halves after a regroup (kept ones renumbered,
    rebuilt ones fresh; a composed PD + tiers half read through its tiers): a lost scheduler's index and counters
    leave the engine's totals."""
    from types import SimpleNamespace

    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 20))
    sides = [conn.scheduler_side(r) for r in range(3)]
    for i, s in enumerate(sides):
        s.index = SimpleNamespace(stats={"host": TierStats(stored=10 ** i), "disk": TierStats()})
    assert conn.offload_tier_stats()["host"].stored == 111
    conn.retain_scheduler_sides([sides[2], SimpleNamespace(tiers=sides[0]), None])
    assert conn.tier_index(0) is sides[2].index and conn.tier_index(1) is sides[0].index
    assert conn.offload_tier_stats()["host"].stored == 101
