"""The prefill side's saved KV, waiting for a decode engine to fetch it: bounded in time and in bytes.

A prefill engine copies a request's prompt KV to host memory when it saves it (`PagedKVBlocks.read`) and frees
its own blocks at once, so what it holds for decode engines is this store, one per rank. Nothing in it lives
for ever: an entry goes when a decode engine fetches it (`take`), when it is older than `ttl_s` (a decode engine
that never came), or, oldest first, when a new entry would put the store past `max_bytes`. Every way out is
counted (`counters`), so a test or a metrics scrape sees where the entries went. Under tensor parallelism an entry
is a rank's heads' shard, taken once per decode rank that holds some of those heads and dropped when all have
(`take`'s claimant; engine/kv_transfer/tp_shard.py).

A save's bytes may still be on their way from the device when its request's output (which names the key) reaches
a decode engine (`PagedKVBlocks.read_async`: the copy overlaps the next steps). The rank announces the key
first (`expect`, in the step that computes the prompt's last token, before the output exists), and a fetch of an
announced key waits for its `put` (or `abandon`) within the fetch's own deadline (`peek(key, wait_s)`).

Held entries (NIXL in place, engine/kv_transfer/nixl_inplace.py): `hold` keeps a `HeldKV`, which names blocks
still in the rank's cache, not bytes; it counts nothing against `max_bytes` here but against its own bounds, given
per hold (`HoldBounds`: a share of the rank's cache in all, and a smaller share per client): a new hold first
releases its client's oldest holds past the client's share, then anyone's oldest past the total (counted
`num_hold_evicted`), so a client that never fetches holds a bounded part of the pool and cannot starve admission;
one alone past a bound is not held (the rank copies it instead). A held entry leaves by one way of five: claimed by
a fetch (`take`) whose reply then ends (`release`: its rows are staged out of the cache at once, before any byte
leaves), its own `hold_until` passing (`nixl_hold_s`), evicted by a newer hold, a fetch that cannot read it in place
(`end_hold`: a decode TP rank asking for its heads), or `clear`. Each way out puts the save's transfer id in
`released()`, which the rank's poll reports to the scheduler, which then frees the blocks.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..contract.kv_blocks import SavedKV

if TYPE_CHECKING:
    from .nixl_inplace import HeldKV


@dataclass
class StoreCounters:
    num_saved: int = 0
    num_served: int = 0  # fetched by a decode engine, then dropped
    num_expired: int = 0  # dropped after ttl_s
    num_evicted: int = 0  # dropped, oldest first, to stay within max_bytes
    num_replaced: int = 0  # saved again under the same key before it was fetched
    bytes_served: int = 0
    num_held: int = 0  # of num_saved, those held in place (blocks kept in the cache, nothing copied)
    num_hold_expired: int = 0  # held and never claimed within nixl_hold_s
    num_hold_evicted: int = 0  # held, then released unclaimed for a newer hold past the total or its client's share


@dataclass(frozen=True)
class HoldBounds:
    """What held saves may name at once, in cache bytes: `total` on the rank, `per_client` for one client (the
    widest name of `Request.client`; anonymous holds count against `total` only)."""

    total: int
    per_client: int


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
        self._held: dict[str, HeldKV] = {}  # key -> HeldKV not claimed yet
        self._released: list[int] = []  # save transfer ids whose hold ended, for the next poll
        self._unread: set[int] = set()  # of those, the ones no fetch claimed (expired, evicted, replaced, ...)
        self._claims: dict[str, set[int]] = {}  # key -> the decode TP ranks that claimed a shard of it (take)
        # The global kv heads this rank's saves hold (engine/kv_transfer/tp_shard.Heads; None: every head its
        # layout has, or a whole latent), set by the worker under tensor parallelism.
        self.heads = None
        # (TP rank, TP size) of a rank whose saves hold per-sequence states: the one decode rank that may take them
        # (engine/kv_transfer/tp_shard.py); None: any decode rank whose heads this rank holds.
        self.reader: tuple[int, int] | None = None
        self.counters = StoreCounters()
        # The layout of what this rank saves (its cache's, engine/contract/kv_blocks.py), known from the first save:
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
            self._claims.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
                self.counters.num_replaced += 1
            if saved.nbytes > self.max_bytes:  # alone past the bound: never held (and nothing else dropped for it)
                self.counters.num_evicted += 1
                return
            while self._saved and self._bytes + saved.nbytes > self.max_bytes:
                gone, (_, evicted) = self._saved.popitem(last=False)
                self._claims.pop(gone, None)
                self._bytes -= evicted.nbytes
                self.counters.num_evicted += 1
            self._saved[key] = (self._clock(), saved)
            self._bytes += saved.nbytes
            self.counters.num_saved += 1
            self.layout = saved.layout

    def hold(self, key: str, held: HeldKV, hold_s: float, bounds: HoldBounds) -> bool:
        """Hold `held` (a HeldKV) under `key` until claimed and released, for `hold_s` at most, or cleared; older
        holds released first to keep within `bounds` (module docstring). False, and nothing held or released, when
        `held` alone is past a bound: the caller copies it instead."""
        client = tuple(getattr(held, "client", ()))
        if held.nbytes > bounds.total or (client and held.nbytes > bounds.per_client):
            return False
        with self._lock:
            held.hold_until = self._clock() + hold_s
            self._settle(key)
            self._expire()
            old = self._held.pop(key, None)
            if old is not None:
                self._unread_release(old.transfer_id)
                self.counters.num_replaced += 1
            if client:
                self._evict_holds(lambda h: tuple(getattr(h, "client", ())) == client, bounds.per_client - held.nbytes)
            self._evict_holds(lambda h: True, bounds.total - held.nbytes)
            self._held[key] = held
            self.counters.num_saved += 1
            self.counters.num_held += 1
            self.layout = held.layout
            return True

    def _evict_holds(self, whose, room: int) -> None:
        """Release the oldest unclaimed holds that `whose` picks until theirs name at most `room` bytes."""
        picked = [(k, h) for k, h in self._held.items() if whose(h)]  # oldest first (insertion order)
        total = sum(h.nbytes for _, h in picked)
        for k, h in picked:
            if total <= room:
                break
            del self._held[k]
            self._unread_release(h.transfer_id)
            self.counters.num_hold_evicted += 1
            total -= h.nbytes

    def release(self, held) -> None:
        """A claimed held entry's reply ended: its blocks may go back (reported by the next `released()`)."""
        with self._lock:
            self._released.append(held.transfer_id)

    def end_hold(self, key: str, held) -> None:
        """End the hold of `held` (what `peek` returned under `key`) unread: a decode engine that cannot read it in
        place asked for it (a TP shard, engine/kv_transfer/tp_shard.py), and recomputes; its blocks go back."""
        with self._lock:
            if self._held.get(key) is held:
                del self._held[key]
                self._unread_release(held.transfer_id)

    def released(self) -> list[int]:
        """The save transfer ids whose hold ended since the last call (expired ones swept first)."""
        return [tid for tid, _ in self.released_outcomes()]

    def released_outcomes(self) -> list[tuple[int, bool]]:
        """As `released`, each with whether a fetch claimed it (False: it expired, was evicted, replaced, refused
        or cleared unread: the rank reports that save ended unread, which the scheduler counts)."""
        with self._lock:
            self._expire()
            out, self._released = self._released, []
            unread, self._unread = self._unread, set()
            return [(tid, tid not in unread) for tid in out]

    def _unread_release(self, tid: int) -> None:
        self._released.append(tid)
        self._unread.add(tid)

    def peek(self, key: str, wait_s: float = 0.0) -> SavedKV | None:
        """The entry under `key`, waiting up to `wait_s` for a save of it that has begun (`expect`)."""
        with self._lock:
            if key in self._expected:
                self._arrived.wait_for(lambda: key not in self._expected, wait_s)
            self._expire()
            held = self._held.get(key)
            if held is not None:
                return held
            entry = self._saved.get(key)
            return None if entry is None else entry[1]

    def take(self, key: str, saved: SavedKV, claimant: int | None = None, needed: frozenset = frozenset()) -> bool:
        """Claim `saved` (what `peek` returned) for one decode engine: dropped from the store, counted served.
        False when another fetch claimed it first (or a newer entry replaced it): a saved KV is served once.
        Under tensor parallelism (engine/kv_transfer/tp_shard.py) once per decode rank: `claimant` is the decode
        TP rank, `needed` the ranks that take from this entry; it is dropped once all of them have claimed it."""
        with self._lock:
            if self._held.get(key) is saved:
                del self._held[key]  # its blocks stay held until `release`
                self.counters.num_served += 1
                self.counters.bytes_served += saved.nbytes
                return True
            entry = self._saved.get(key)
            if entry is None or entry[1] is not saved:
                return False
            if claimant is not None:
                claims = self._claims.setdefault(key, set())
                if claimant in claims:
                    return False
                claims.add(claimant)
                if not needed <= claims:
                    return True  # other decode ranks still take their heads from it
            self._claims.pop(key, None)
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
            self._claims.clear()
            for h in self._held.values():
                self._unread_release(h.transfer_id)
            self._held.clear()
            self._expected.clear()
            self._bytes = 0
            self._arrived.notify_all()

    def drop_held(self) -> None:
        """Forget the held entries not claimed yet without reporting them (an elastic rewind: the scheduler
        counted their saves failed and freed the blocks already)."""
        with self._lock:
            self._held.clear()
            self._released.clear()
            self._unread.clear()

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, h in self._held.items() if h.hold_until <= now]:
            self._unread_release(self._held.pop(key).transfer_id)
            self.counters.num_hold_expired += 1
        cutoff = now - self.ttl_s
        while self._saved:
            key, (t, saved) = next(iter(self._saved.items()))
            if t > cutoff:
                break
            del self._saved[key]
            self._claims.pop(key, None)
            self._bytes -= saved.nbytes
            self.counters.num_expired += 1

    @property
    def held_nbytes(self) -> int:
        """The cache bytes the held entries not claimed yet name (the worker bounds them by `max_bytes` too)."""
        with self._lock:
            return sum(h.nbytes for h in self._held.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._saved) + len(self._held)


__all__ = ["HoldBounds", "SavedKVStore", "StoreCounters"]
