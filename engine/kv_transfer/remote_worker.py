"""The remote KV connector's worker half (engine/kv_transfer/remote.py is the factory and the scheduler half; its
docstring tells the whole): on each rank, the saved-KV store and the transport's server that serves it, the saves
(a copy to host memory, or over NIXL in place a hold on the cache's blocks: engine/kv_transfer/nixl_inplace.py), and
the loads, each fetched on a thread of its own and written layer by layer as it arrives (engine/kv_transfer/
arrival.py); `poll` reports what finished to the rank's step loop. Under tensor parallelism a rank saves its
heads' shard (or nothing, when an earlier rank of its group holds the same heads), a load makes one fetch per
prefill rank holding some of its heads (`_sources`, engine/kv_transfer/tp_shard.py), and `poll` reports what
every rank of the group has finished (engine/kv_transfer/tp_join.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from moelink.engine.contract.safe_text import shown
from moelink.scheduler.outputs import KVTransfer

from .arrival import ArrivalWriter, LoadDropped, LoadWriteFailed
from .auth import SecretAuth, is_capability
from ..contract.kv_blocks import STATE, PagedKVBlocks, PendingRead
from .config import RemoteKVConfig, RemoteSource
from .nixl_inplace import cache_nbytes, register_at_allocation
from .peers import describe_peers, peer_allowed
from .server import ServerLimits
from .store import HoldBounds, SavedKVStore
from .tp_join import TPJoin
from .tp_shard import KVShardSpec, ShardAsk, local_heads, plan_fetches, token_tp_size, with_heads
from .transport import make_transport
from .wire import KVFetchError

logger = logging.getLogger(__name__)


@dataclass
class WorkerKVStats:
    num_loaded: int = 0
    num_failed: int = 0
    bytes_loaded: int = 0
    fetch_s: float = 0.0  # summed wall seconds of the successful fetches
    loaded_from: dict = field(default_factory=dict)  # "host:port" -> loads it served (which prefill rank)
    failures: deque = field(default_factory=lambda: deque(maxlen=32))  # (request id, reason), the latest


class RemoteWorkerSide:
    """A rank's worker half (module docstring): its saved-KV store and server, and its fetches."""

    def __init__(self, config: RemoteKVConfig, rank: int, shard: KVShardSpec | None = None,
                 loads: bool = True) -> None:
        self.config = config
        self.loads = loads  # this rank may load KV (not a kv_producer): its cache is registered for READs into it
        self._cache_bytes = 0  # the rank's KV cache bytes, from `cache_allocated` (what the hold bounds are shares of)
        # Tensor parallelism (engine/kv_transfer/tp_shard.py): this rank's place in its group, and the channel
        # that joins the group's reports on its first rank (tp_join.py).
        self.shard = shard if shard is not None and shard.tp_size > 1 else None
        tp = 1 if self.shard is None else self.shard.tp_size
        self.tp_rank = rank % tp
        self._join = None if self.shard is None else TPJoin(f"{self.shard.join_id}-{rank // tp}", self.tp_rank, tp)
        limits = ServerLimits(handshake_timeout_s=config.first_byte_timeout_s, io_timeout_s=config.fetch_timeout_s,
                              max_prompt_tokens=config.max_prompt_tokens)
        self.transport = make_transport(config.transport, config.connect_timeout_s, config.fetch_timeout_s,
                                        SecretAuth(config.secret), config.first_byte_timeout_s, limits)
        if hasattr(self.transport, "bind_hosts"):  # NIXL: UCX kept to the interfaces asked (ucx_net.py)
            self.transport.bind_hosts(config.host if config.port is not None else None,
                                      tuple(h for h, _, _ in config.peers or ()))
        self.store = SavedKVStore(config.ttl_s, config.max_saved_bytes)
        try:
            self.server = None if config.port is None else self.transport.serve(self.store, config.host,
                                                                                config.port + rank)
        except BaseException:
            # A port another process holds (or any failed start) must not leave the transport's NIXL agent, with
            # its progress thread, open behind the error.
            self.transport.close()
            raise
        self.stats = WorkerKVStats()
        self._lock = threading.Lock()
        self._done: dict[int, bool] = {}
        self._written: list[tuple[KVTransfer, ArrivalWriter]] = []  # loads fully arrived, written or landing
        self._writers: set[ArrivalWriter] = set()  # loads arriving now
        self._write_lock = threading.Lock()  # held by a group's write and by drop_pending
        self._saving: list[tuple[KVTransfer, PendingRead]] = []  # saves whose bytes are not in host memory yet
        self._fetches: set[threading.Thread] = set()
        # Bumped by drop_pending: a fetch started under an older generation is discarded when it arrives.
        self._generation = 0

    # saves: on their way to host memory from now (read_async: a side-stream copy on a GPU); stored and reported
    # by the first poll that finds them there, so the blocks stay the scheduler's until the bytes are out.
    def start_save(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        if not is_capability(t.params):  # the scheduler half names the key (save_params): never a request id
            logger.warning("KV save of request %s has no capability to be saved under: not saved", shown(t.req_id))
            with self._lock:
                self._done[t.transfer_id] = False
            return
        if self.shard is not None:
            if not self.shard.saves(self.tp_rank):  # an earlier rank of the group saves these heads (tp_shard.py)
                with self._lock:
                    self._done[t.transfer_id] = True
                return
            self.store.heads = self.shard.heads(self.tp_rank)
            if self.shard.states:  # its states are its own: only the decode rank of its place takes them
                self.store.reader = (self.tp_rank, self.shard.tp_size)
        # Held in place until a decode rank reads it (nixl_inplace.py): nothing copied now. Only a request that asked
        # for the handoff itself (SaveKey.hold), within the hold bounds (older holds released first); else copied.
        region = self._region(kv) if getattr(t.params, "hold", True) else None
        if region is not None:
            held = region.held(t, tuple(getattr(t.params, "client", ())))
            if self.store.hold(t.params, held, self.config.nixl_hold_s, self._hold_bounds(kv)):
                return
        self.store.expect(t.params)  # before the request's output can name the key to a decode engine
        try:
            # The scheduler does not step for a save it holds (scheduler/kv_connector.py): one it meant to hold but
            # copied instead (past the hold bounds) must be in the store by this step's poll, so it is copied now
            # (a device-to-host sync on CUDA, on this rare path only). One not meant to be held is awaited as usual.
            held_by_scheduler = self.holds_saves_of(kv) and getattr(t.params, "hold", True)
            pending = PendingRead(kv.read(t)) if held_by_scheduler else kv.read_async(t)
        except (RuntimeError, ValueError) as exc:  # a copy that could not start (device memory): not saved
            self.store.abandon(t.params)
            logger.warning("KV save of request %s failed (a decode engine recomputes it): %s", shown(t.req_id), exc)
            with self._lock:
                self._done[t.transfer_id] = False
            return
        with self._lock:
            self._saving.append((t, pending))

    def cache_allocated(self, kv: PagedKVBlocks) -> None:
        """The rank's cache, just allocated (the model runner calls this): registered now with the fetching NIXL
        agent of a rank that loads (its READs land in its blocks), not at the first fetch
        (nixl_inplace.register_at_allocation). Never with the serving agent: a peer never gets a key to the cache.
        Only where the in-place path will use it: not under TP (a save is a head shard, copied) nor with state
        groups (the copy path)."""
        self._cache_bytes = cache_nbytes(kv) if isinstance(kv, PagedKVBlocks) else 0
        if (self.config.nixl_in_place and self.shard is None and isinstance(kv, PagedKVBlocks) and self.loads
                and not any(kind == STATE for _, kind in kv.groups)):
            register_at_allocation(self.transport, kv)

    def _hold_bounds(self, kv: PagedKVBlocks) -> HoldBounds:
        """The bytes held saves may name on this rank (RemoteKVConfig.nixl_hold_fraction / _client_fraction of
        its cache), and never past `max_saved_bytes`."""
        cache = self._cache_bytes or cache_nbytes(kv)
        total = min(int(cache * self.config.nixl_hold_fraction), self.config.max_saved_bytes)
        return HoldBounds(total, min(total, int(cache * self.config.nixl_hold_client_fraction)))

    def holds_saves_of(self, kv: PagedKVBlocks) -> bool:
        """Whether the scheduler half treats this rank's saves as held (`holds_saves`; never with state groups)."""
        return (self.config.nixl_in_place and self.server is not None and isinstance(kv, PagedKVBlocks)
                and self.shard is None
                and getattr(self.transport, "hold_region", None) is not None
                and not any(kind == STATE for _, kind in kv.groups))

    def _region(self, kv: PagedKVBlocks):
        """The cache whose saves are held in place (NIXL, `nixl_in_place`), or None: the copy path."""
        hold = getattr(self.transport, "hold_region", None)
        if hold is None or not self.config.nixl_in_place or self.server is None or self.shard is not None:
            return None  # (under TP a save is a head shard, copied: the held blocks are not cut by heads)
        return hold(kv)

    # loads: fetched on a thread; written into the blocks by the next poll after they arrive
    def start_load(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        if not isinstance(t.params, RemoteSource):
            self._fail(t, "the load names no remote source (a request without kv_transfer_params)")
            return
        src = t.params
        if not peer_allowed(self.config.peers, src.host, src.port, src.num_ranks):  # checked when added, too
            self._fail(t, f"{src.host}:{src.port} is not one of this engine's KV peers ({describe_peers(self.config.peers)})")
            return
        th = threading.Thread(target=self._fetch, args=(t, kv, self._generation), name=f"kv-fetch-{t.transfer_id}",
                              daemon=True)
        with self._lock:
            self._fetches.add(th)
        th.start()

    def _sources(self, src: RemoteSource, kv: PagedKVBlocks) -> list[tuple[range, str, tuple, tuple | None]]:
        """Per fetch a load makes: the ports to ask in turn, the key, the layout of the rows asked, and where they go
        in this rank's heads ((offset, count); None: all of them). One fetch without TP on either side (data-parallel
        attention: the KV is on the one prefill rank that computed it, asked in turn); under TP one per prefill rank
        holding some of this rank's heads (engine/kv_transfer/tp_shard.py). ValueError for a source that cannot
        be a TP group."""
        every = range(src.port, src.port + src.num_ranks)
        prefill_tp = token_tp_size(src.key)
        if prefill_tp == 1 and self.shard is None:
            return [(every, src.key, kv.layout, None)]
        tp = 1 if self.shard is None else self.shard.tp_size
        mine = local_heads(self.shard, self.tp_rank, kv.layout)
        states = any(kind == STATE for kind, _ in kv.layout)
        if states and prefill_tp != tp:
            plan_fetches(mine, self.tp_rank, tp, prefill_tp, states)  # raises, naming why
        if prefill_tp == 1:  # its ranks hold every head: each asked in turn for this rank's
            return [(every, ShardAsk(mine, self.tp_rank, tp).key(src.key), kv.layout, None)]
        if src.num_ranks != prefill_tp:
            raise ValueError(f"remote_ranks={src.num_ranks}, but the KV was saved by a TP group of {prefill_tp} ranks")
        out = []
        for p, ask in plan_fetches(mine, self.tp_rank, tp, prefill_tp, states):
            part = ask.heads
            layout = kv.layout if part is None else with_heads(kv.layout, part.count)
            to = None if part is None or part == mine else (part.start - mine.start, part.count)
            out.append((range(src.port + p, src.port + p + 1), ask.key(src.key), layout, to))
        return out

    def _fetch(self, t: KVTransfer, kv: PagedKVBlocks, generation: int) -> None:
        src: RemoteSource = t.params
        t0 = time.monotonic()
        want = list(src.token_ids[:t.num_tokens])
        max_blocks = -(-t.num_tokens // kv.block_size)
        writer = ArrivalWriter(t, kv, generation, lambda: self._generation, self._write_lock)
        try:
            for ports, key, layout, heads in self._sources(src, kv):
                writer.heads = heads
                port = self._fetch_one(src.host, ports, key, layout, want, max_blocks, t0, kv, writer)
            with self._lock:
                if generation != self._generation:
                    return  # dropped (an elastic rewind): its blocks may be another request's by now
                self.stats.fetch_s += time.monotonic() - t0
                where = f"{src.host}:{port}"
                self.stats.loaded_from[where] = self.stats.loaded_from.get(where, 0) + 1
                self._written.append((t, writer))
        except LoadDropped:
            return  # the scheduler awaits no report of it
        except (KVFetchError, LoadWriteFailed, ValueError) as exc:
            self._fail(t, str(exc), generation)
        except Exception as exc:  # a load must be reported whatever happens, or its request would wait for ever
            self._fail(t, f"unexpected error: {exc!r}", generation)
        finally:
            with self._lock:
                self._fetches.discard(threading.current_thread())

    def _fetch_one(self, host: str, ports: range, key: str, layout: tuple, want: list[int], max_blocks: int,
                   t0: float, kv: PagedKVBlocks, writer: ArrivalWriter) -> int:
        """One fetch, its ports asked in turn until one has it (each group written as it arrives: arrival.py);
        the port that had it, or KVFetchError with every port's reason."""
        reasons = []
        for port in ports:
            left = self.config.fetch_timeout_s - (time.monotonic() - t0)
            written = writer.nbytes
            with self._lock:
                self._writers.add(writer)
            try:
                self.transport.fetch(host, port, key, layout, want, max_blocks, left, kv.device, on_group=writer)
                return port
            except KVFetchError as exc:
                reasons.append(str(exc))
                writer.nbytes = written  # what this port wrote is written again from the next
            finally:
                with self._lock:
                    self._writers.discard(writer)
        raise KVFetchError("; ".join(reasons))

    def _fail(self, t: KVTransfer, reason: str, generation: int | None = None) -> None:
        logger.warning("KV load of request %s failed (it is recomputed, or ends if it can only load): %s", shown(t.req_id), reason)
        with self._lock:
            if generation is not None and generation != self._generation:
                return  # dropped: the scheduler awaits no report of it
            self.stats.num_failed += 1
            self.stats.failures.append((t.req_id, reason))
            self._done[t.transfer_id] = False

    def poll(self) -> dict[int, bool] | None:
        with self._lock:
            saving, self._saving = self._saving, []
        ready = [(t, p) for t, p in saving if p.done()]  # event queries: no host sync
        if len(ready) < len(saving):
            with self._lock:
                self._saving = [(t, p) for t, p in saving if not p.done()] + self._saving
        for t, p in ready:
            self.store.put(t.params, p.saved)
            with self._lock:
                self._done[t.transfer_id] = True
        # Holds ended: claimed by a fetch (True), or unread (False: expired, evicted for a newer hold, cleared): the
        # scheduler frees the blocks either way and counts which (metrics: moelink_kv_transfer_holds_ended).
        released = self.store.released_outcomes()
        if released:
            with self._lock:
                self._done.update(released)
        with self._lock:
            written, self._written = self._written, []
        landed = [(t, w) for t, w in written if w.done()]  # event queries on a GPU: no host sync
        if len(landed) < len(written):
            with self._lock:
                self._written = [(t, w) for t, w in written if not w.done()] + self._written
        for t, w in landed:
            with self._lock:
                self.stats.num_loaded += 1
                self.stats.bytes_loaded += w.nbytes
                self._done[t.transfer_id] = True
        self.store.expire()
        with self._lock:
            done, self._done = self._done, {}
        if self._join is not None:  # under TP: reported once every rank of the group has it (tp_join.py)
            return self._join.join(done)
        return done or None

    def drop_pending(self) -> None:
        """Forget every load in flight and every report not polled yet: the scheduler counted them failed (an
        elastic rewind), so a fetch that arrives later must not write blocks that may have gone to another request,
        and a save still copying may read blocks already rewritten: it is never stored."""
        with self._write_lock, self._lock:  # no group is being written while the generation moves
            self._generation += 1
            writers = [w for _, w in self._written] + list(self._writers)
            self._written, self._done = [], {}
        for w in writers:  # the rank's next steps may reuse these blocks: after the copies already enqueued
            w.fence()
        self._abandon_saves()
        self.store.drop_held()  # their saves count failed, their blocks freed: no fetch may name them now
        if self._join is not None:
            self._join.clear()

    def _abandon_saves(self) -> None:
        with self._lock:
            saving, self._saving = self._saving, []
        for t, _ in saving:  # never put: a fetch waiting for it is answered at once
            self.store.abandon(t.params)

    def close(self) -> None:
        self._abandon_saves()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.store.clear()  # nothing saved outlives the rank
        with self._lock:
            fetches = list(self._fetches)
        for th in fetches:  # each ends within fetch_timeout_s of its start
            th.join(self.config.fetch_timeout_s + self.config.connect_timeout_s)
        self.transport.close()  # after the fetches: NIXL's agents (and their UCX threads) end here
        if self._join is not None:
            self._join.close()


__all__ = ["RemoteWorkerSide", "WorkerKVStats"]
