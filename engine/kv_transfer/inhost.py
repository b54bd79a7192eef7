"""The in-host reference KV connector: engines of one process share a dict of saved KV blocks keyed by request id.

    store = InHostKVStore()
    prefill = LLM(model, kv_connector=InHostKVConnector(store, load=False))   # saves every prompt's KV
    prefill.generate(prompts, SamplingParams(max_tokens=1))
    decode = LLM(model, kv_connector=InHostKVConnector(store, save=False))    # loads it instead of prefilling
    decode.generate(prompts, SamplingParams(max_tokens=64))                   # same request ids: "0", "1", ...

Scheduler half: a fresh request loads when the store holds KV saved for the same request id whose tokens begin
its prompt (`num_loadable_tokens`), and every request is saved once its prompt is computed (`wants_save`); an
entry is dropped once loaded. Worker half: `start_save` copies the request's blocks to host memory
(`PagedKVBlocks.read`) and stores them, `start_load` writes them into the rank's blocks (`PagedKVBlocks.write`,
which refuses another layout: the load is reported failed and the request is recomputed); both finish while they
start and are reported at the next `poll`.

In one process only (the in-process executor, expert_parallel_size 1): the factory refuses to be pickled, so a
Ray executor fails at once instead of giving each rank a copy of the store. What a network transport adds is in
scheduler/kv_connector.py's docstring.
"""
from __future__ import annotations

import logging
import threading

from moelink.scheduler.kv_connector import KVConnector
from moelink.scheduler.outputs import KVTransfer
from moelink.scheduler.request import Request

from ..contract.kv_blocks import PagedKVBlocks, SavedKV

logger = logging.getLogger(__name__)


class InHostKVStore:
    """Saved KV (`SavedKV`, host memory) by request id; thread-safe (the workers' device work writes it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saved: dict[str, SavedKV] = {}
        self.num_saved = self.num_loaded = self.num_failed = 0

    def put(self, req_id: str, saved: SavedKV) -> None:
        with self._lock:
            self._saved[req_id] = saved
            self.num_saved += 1

    def get(self, req_id: str) -> SavedKV | None:
        with self._lock:
            return self._saved.get(req_id)

    def pop(self, req_id: str) -> SavedKV | None:
        with self._lock:
            return self._saved.pop(req_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._saved)

    def __contains__(self, req_id: str) -> bool:
        with self._lock:
            return req_id in self._saved


class InHostKVConnector:
    """The factory (engine/contract/kv_connector.py): `save` the prompt KV of every request, `load` it for
    requests the store holds."""

    def __init__(self, store: InHostKVStore, save: bool = True, load: bool = True) -> None:
        self.store, self.save, self.load = store, save, load

    def scheduler_side(self, rank: int) -> KVConnector:
        return _SchedulerSide(self.store, self.save, self.load)

    def worker_side(self, rank: int) -> "_WorkerSide":
        return _WorkerSide(self.store)

    def __reduce__(self):
        raise TypeError("InHostKVConnector works inside one process (the in-process executor, "
                        "expert_parallel_size=1): its store cannot be shared with Ray workers.")

    def __deepcopy__(self, memo) -> "InHostKVConnector":
        return self  # one store, however the config holding it is copied


class _SchedulerSide:
    def __init__(self, store: InHostKVStore, save: bool, load: bool) -> None:
        self.store, self.save, self.load = store, save, load

    def num_loadable_tokens(self, req: Request) -> int:
        saved = self.store.get(req.request_id) if self.load else None
        if saved is None or tuple(req.prompt_token_ids[:len(saved.token_ids)]) != saved.token_ids:
            return 0
        return saved.num_tokens

    def wants_save(self, req: Request) -> bool:
        return self.save

    def transfer_done(self, transfer: KVTransfer, ok: bool) -> None:
        if not transfer.token_ids:  # a load
            if ok:
                self.store.pop(transfer.req_id)  # consumed
                self.store.num_loaded += 1
            else:
                self.store.num_failed += 1


class _WorkerSide:
    def __init__(self, store: InHostKVStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._done: dict[int, bool] = {}

    def _report(self, t: KVTransfer, ok: bool) -> None:
        with self._lock:
            self._done[t.transfer_id] = ok

    def start_save(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        self.store.put(t.req_id, kv.read(t))
        self._report(t, True)

    def start_load(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        saved = self.store.get(t.req_id)
        try:
            if saved is None:
                raise ValueError(f"request {t.req_id!r}: nothing saved")
            kv.write(t, saved)
        except ValueError as exc:
            logger.warning("KV load failed (the request is recomputed): %s", exc)
            self._report(t, False)
            return
        self._report(t, True)

    def poll(self) -> dict[int, bool] | None:
        with self._lock:
            done, self._done = self._done, {}
        return done or None

    def drop_pending(self) -> None:
        with self._lock:
            self._done = {}  # every transfer ran while it started: only unreported results to forget

    def close(self) -> None:
        pass  # the store belongs to whoever made it


__all__ = ["InHostKVConnector", "InHostKVStore"]
