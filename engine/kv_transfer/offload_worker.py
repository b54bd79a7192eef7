"""The KV offload tiers' worker half (engine/kv_transfer/offload.py is the factory and the scheduler half, and its
docstring tells the whole): one per rank, in the rank's process, it only moves bytes. A step's tier work (`StepOps`:
push-downs, then device -> host copies of the blocks the step's allocation evicted) runs inline, before the step's
forward writes those blocks; a load (`LoadPlan`: disk -> host -> device) runs on the rank's loader thread, on CUDA on
a side stream that first waits for the work enqueued so far; each is reported at the first `poll` after it ends.
The host slots and the disk file are offload_store.py's `TierStore`, allocated at the first tier work. Under tensor
parallelism `poll` reports what every rank of the TP group has done, on the group's first rank (tp_join.py).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moelink.scheduler.outputs import KVTransfer

from ..contract.kv_blocks import PagedKVBlocks
from .offload_store import TierStore
from .offload_tiers import LoadPlan, StepOps
from .tp_join import TPJoin

logger = logging.getLogger(__name__)


class TierWorkerSide:
    """A rank's bytes (module docstring): tier work inline, loads on a thread; reports at `poll`."""

    def __init__(self, owner, rank: int) -> None:
        """`owner`: the OffloadKVConnector (its config, TP layout, and in one process the bytes it learns here)."""
        self.owner, self.rank = owner, rank
        tp = owner.tp_size
        # Under TP: the channel that reports a transfer once every rank of the group has it done (tp_join.py).
        self._join = None if tp == 1 else TPJoin(f"offload-{owner.shard.join_id}-{rank // tp}", rank % tp, tp)
        self.store: TierStore | None = None
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._done: dict[int, bool] = {}
        self._loads: dict[int, Future] = {}  # transfer id -> the loader thread's future
        self._pool: ThreadPoolExecutor | None = None
        self._warned: set[str] = set()
        self._stream: torch.cuda.Stream | None = None

    def _store_for(self, kv: PagedKVBlocks) -> TierStore:
        if self.store is None:
            if self._refused is not None:
                raise ValueError(self._refused)
            try:
                self.store = TierStore(kv, self.owner.config, self.rank)
            # (a disk tier's directory or file that cannot be made; slots this process cannot allocate: torch
            # raises RuntimeError, a bare MemoryError says nothing, hence its type)
            except (ValueError, OSError, MemoryError, RuntimeError) as exc:
                self._refused = f"offload is off: {str(exc) or type(exc).__name__}"
                raise ValueError(self._refused) from None
            if self.owner.block_bytes is None:
                self.owner.state_bytes = self.store.state_bytes  # in one process: the scheduler half reads them
                self.owner.block_bytes = self.store.block_bytes
        return self.store

    def start_load(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        p = t.params
        if isinstance(p, StepOps):
            ok = True
            try:
                store = self._store_for(kv)
                if p.block_bytes and p.block_bytes != store.block_bytes:
                    raise ValueError(f"the scheduler counts {p.block_bytes} bytes per block, this rank's cache has "
                                     f"{store.block_bytes}")
                if p.block_bytes and p.state_bytes != store.state_bytes:
                    # The state bytes split the host tier between states and blocks: both halves must count alike.
                    raise ValueError(f"the scheduler counts {p.state_bytes} bytes per state, this rank's state pools "
                                     f"have {store.state_bytes}")
                failed = None
                try:
                    store.demote(p.demote)  # before the saves: a pushed-down slot may take a new block now
                except OSError as exc:  # a full or failing disk: those slots are never read (TierStore.demote)
                    failed = exc
                # The saves run all the same: a load the scheduler plans before it hears of this step's failure
                # reads these host slots, so they must hold their blocks.
                store.save(kv, p.save_blocks, p.save_slots)
                store.save_states(p.save_states)
                if failed is not None:
                    raise failed
            except (ValueError, OSError) as exc:
                self._warn_once(f"KV offload: a step's tier work failed (its blocks are dropped): {exc}")
                ok = False
            self._report(t.transfer_id, ok)
        elif isinstance(p, LoadPlan) and p.host_slots and self.store is not None and p.first_block == t.first_block:
            event = None
            if kv.device.type == "cuda":  # the side stream starts after the step's earlier work (its saves)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(kv.device))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kv-offload-{self.rank}")
            self._loads[t.transfer_id] = self._pool.submit(self._load, t, p, kv, event)
        else:
            # A load the tiers could not plan, or planned for another device hit than the scheduler took (its
            # blocks would land off by the difference): recomputed.
            self._report(t.transfer_id, False)

    def _load(self, t: KVTransfer, p: LoadPlan, kv: PagedKVBlocks, event) -> None:
        """On the loader thread: disk -> host, then host -> device (on CUDA on the side stream, after `event`:
        the work enqueued before the load, this step's saves of the blocks it overwrites)."""
        self.store.promote(p.promote)
        if event is None:
            self.store.load(kv, t, p)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(kv.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(event)
            self.store.load(kv, t, p)
        # Device-to-host sync, on this thread only: the load is reported (and its staging reused) once it landed.
        self._stream.synchronize()

    def _warn_once(self, msg: str) -> None:
        """Each distinct failure logged once per rank (one that repeats every step would flood the log)."""
        if msg not in self._warned:
            self._warned.add(msg)
            logger.warning("%s (rank %d; logged once)", msg, self.rank)

    def start_save(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        self._report(t.transfer_id, True)  # never planned: the scheduler half wants no save

    def _report(self, tid: int, ok: bool) -> None:
        with self._lock:
            self._done[tid] = ok

    def poll(self) -> dict[int, bool] | None:
        for tid, fut in list(self._loads.items()):
            if not fut.done():
                continue
            del self._loads[tid]
            exc = fut.exception()
            if exc is not None:
                self._warn_once(f"KV offload: a load failed (its request is recomputed): {exc!r}")
            self._report(tid, exc is None)
        with self._lock:
            done, self._done = self._done, {}
        if self._join is not None:  # under TP: what every rank of the group has done (on its first rank)
            return self._join.join(done or None)
        return done or None

    def drop_pending(self) -> None:
        for fut in self._loads.values():
            fut.exception()  # wait: the blocks it writes go to other requests after a rewind
        self._loads.clear()
        with self._lock:
            self._done = {}
        if self._join is not None:
            self._join.clear()

    def close(self) -> None:
        if self._join is not None:
            self._join.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.store is not None:
            self.store.close()
            self.store = None
        # A rank that keeps its runner through an elastic regroup (engine/rank/keep_runner.py) keeps this half after
        # its shutdown closed it: later tier work and loads are reported failed (the blocks recomputed), never run
        # on freed buffers.
        self._refused = "offload is off: the rank's tiers were closed (its group was re-formed)"


__all__ = ["TierWorkerSide"]
