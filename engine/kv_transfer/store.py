"""The prefill side's saved KV, waiting for a decode engine to fetch it: bounded in time and in bytes.

A prefill engine copies a request's prompt KV to host memory when it saves it (`PagedKVBlocks.read`) and frees
its own blocks at once, so what it holds for decode engines is this store, one per rank. Nothing in it lives
for ever: an entry goes when a decode engine fetches it (`take`), when it is older than `ttl_s` (a decode engine
that never came), or, oldest first, when a new entry would put the store past `max_bytes`. Every way out is
counted (`counters`), so a test or a metrics scrape sees where the entries went.

A save's bytes may still be on their way from the device when its request's output (which names the key) reaches
a decode engine (`PagedKVBlocks.read_async`: the copy overlaps the next steps). The rank announces the key
first (`expect`, in the step that computes the prompt's last token, before the output exists), and a fetch of an
announced key waits for its `put` (or `abandon`) within the fetch's own deadline (`peek(key, wait_s)`).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .blocks import SavedKV


@dataclass
class StoreCounters:
    num_saved: int = 0
    num_served: int = 0  # fetched by a decode engine, then dropped
    num_expired: int = 0  # dropped after ttl_s
    num_evicted: int = 0  # dropped, oldest first, to stay within max_bytes
    num_replaced: int = 0  # saved again under the same key before it was fetched
    bytes_served: int = 0


class SavedKVStore:
    """Saved KV by key (a random capability per save, never a request id), thread-safe: the rank's device work
    puts, the server's connection threads take. `clock`: seconds, monotonic (tests pass their own)."""

    def __init__(self, ttl_s: float, max_bytes: int, clock=time.monotonic) -> None:
        self.ttl_s, self.max_bytes, self._clock = ttl_s, max_bytes, clock
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._expected: dict[str, int] = {}  # key -> saves announced and not put or abandoned yet
        self._saved: OrderedDict[str, tuple[float, SavedKV]] = OrderedDict()  # oldest first
        self._bytes = 0
        self.counters = StoreCounters()
        # The layout of what this rank saves (its cache's, engine/kv_transfer/blocks.py), known from the first save:
        # a server refuses a decode engine of another layout by name, whatever key it asks for.
        self.layout: tuple | None = None

    def expect(self, key: str) -> None:
        """A save of `key` has begun: a fetch of it waits for its `put` or `abandon`."""
        with self._lock:
            self._expected[key] = self._expected.get(key, 0) + 1

    def abandon(self, key: str) -> None:
        """An announced save of `key` will not be put (it failed, or the rank is closing)."""
        with self._lock:
            self._settle(key)

    def _settle(self, key: str) -> None:
        n = self._expected.pop(key, 0) - 1
        if n > 0:
            self._expected[key] = n
        self._arrived.notify_all()

    def put(self, key: str, saved: SavedKV) -> None:
        """Hold `saved` under `key` (a capability, engine/kv_transfer/auth.py) until fetched, expired or evicted."""
        with self._lock:
            self._settle(key)
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
            self.layout = saved.layout

    def peek(self, key: str, wait_s: float = 0.0) -> SavedKV | None:
        """The entry under `key`, waiting up to `wait_s` for a save of it that has begun (`expect`)."""
        with self._lock:
            if key in self._expected:
                self._arrived.wait_for(lambda: key not in self._expected, wait_s)
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
        """Drop what is past its TTL (a store op does it too; a server's sweeper calls this while no step runs)."""
        with self._lock:
            self._expire()

    def clear(self) -> None:
        """Drop everything (the rank is closing); a fetch waiting for an announced save is answered at once."""
        with self._lock:
            self._saved.clear()
            self._expected.clear()
            self._bytes = 0
            self._arrived.notify_all()

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
