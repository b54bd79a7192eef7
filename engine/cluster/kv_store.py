"""The prefill side's saved KV, waiting for a decode engine to fetch it: bounded in time and in bytes.

A prefill engine copies a request's prompt KV to host memory when it saves it (`PagedKVBlocks.read`) and frees
its own blocks at once, so what it holds for decode engines is this store, one per rank. Nothing in it lives
for ever: an entry goes when a decode engine fetches it (`take`), when it is older than `ttl_s` (a decode engine
that never came), or, oldest first, when a new entry would put the store past `max_bytes`. Every way out is
counted (`counters`), so a test or a metrics scrape sees where the entries went.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..rank.kv_transfer import SavedKV


@dataclass
class StoreCounters:
    num_saved: int = 0
    num_served: int = 0  # fetched by a decode engine, then dropped
    num_expired: int = 0  # dropped after ttl_s
    num_evicted: int = 0  # dropped, oldest first, to stay within max_bytes
    num_replaced: int = 0  # saved again under the same key before it was fetched
    bytes_served: int = 0


class SavedKVStore:
    """Saved KV by key (the prefill request's id), thread-safe: the rank's device work puts, the server's
    connection threads take. `clock`: seconds, monotonic (tests pass their own)."""

    def __init__(self, ttl_s: float, max_bytes: int, clock=time.monotonic) -> None:
        self.ttl_s, self.max_bytes, self._clock = ttl_s, max_bytes, clock
        self._lock = threading.Lock()
        self._saved: OrderedDict[str, tuple[float, SavedKV]] = OrderedDict()  # oldest first
        self._bytes = 0
        self.counters = StoreCounters()

    def put(self, key: str, saved: SavedKV) -> None:
        with self._lock:
            self._expire()
            old = self._saved.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
                self.counters.num_replaced += 1
            if saved.nbytes > self.max_bytes:  # alone past the bound: never held (and nothing else dropped for it)
                self.counters.num_evicted += 1
                return
            while self._saved and self._bytes + saved.nbytes > self.max_bytes:
                _, (_, evicted) = self._saved.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.counters.num_evicted += 1
            self._saved[key] = (self._clock(), saved)
            self._bytes += saved.nbytes
            self.counters.num_saved += 1

    def peek(self, key: str) -> SavedKV | None:
        with self._lock:
            self._expire()
            entry = self._saved.get(key)
            return None if entry is None else entry[1]

    def take(self, key: str, saved: SavedKV) -> bool:
        """Claim `saved` (what `peek` returned) for one decode engine: dropped from the store, counted served.
        False when another fetch claimed it first (or a newer entry replaced it): a saved KV is served once."""
        with self._lock:
            entry = self._saved.get(key)
            if entry is None or entry[1] is not saved:
                return False
            del self._saved[key]
            self._bytes -= saved.nbytes
            self.counters.num_served += 1
            self.counters.bytes_served += saved.nbytes
            return True

    def expire(self) -> None:
        with self._lock:
            self._expire()

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        while self._saved:
            key, (t, saved) = next(iter(self._saved.items()))
            if t > cutoff:
                break
            del self._saved[key]
            self._bytes -= saved.nbytes
            self.counters.num_expired += 1

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._saved)


__all__ = ["SavedKVStore", "StoreCounters"]
