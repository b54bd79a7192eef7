"""The KV offload tiers' index (issue 47 item 2): which prefix-cache block lives in which slot of host memory or of
the disk file, decided by the scheduler; the bytes are the worker's (engine/kv_transfer/offload_store.py).

A block is keyed by its prefix-cache hash (scheduler/block_pool.py: the chained sha256 of its tokens and every
token before them; a sliding-window table's block by the tagged hash the pool registers it under,
scheduler/sliding_kv.py `sliding_block_hash`), so a block evicted from the device pool and a later request with the same prefix meet under
the same key, and the scheduler asks the tiers with the hashes it computed for its own prefix lookup.

Each tier is a fixed number of block-sized slots (its bytes over one block's bytes: both halves divide the same
way) and an LRU over the keys it holds:

- `store(key)`: a block the device pool just evicted gets a host slot: a free one, or the least recently used
  host entry's, that entry pushed down to a disk slot (a free one, or the least recently used disk entry's, which
  is dropped) or dropped when there is no disk tier. A slot written by a step's work is pinned until that work is
  reported, so no later store in the same step takes it back before the bytes are there.
- `plan_load(keys)`: the slots a request's blocks load from; a block on disk is staged into a host slot first
  (promoted: it leaves the disk tier once its load is reported). Every slot the load reads is pinned until its
  load is reported: neither a store nor a push-down reuses it while a thread still reads it.
- the pushes down each of these makes are queued (`take_demotes`) and run by the worker before the step's copies
  from the device, so a host slot's old bytes reach the disk before a new block overwrites them.

`TierStats` counts, per tier, blocks stored, found and loaded back (their bytes and seconds) and pushed out.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace

TIERS = ("host", "disk")

# The most of the machine's physical memory one rank's host tier may ask for: the rest is the OS's, the process's
# and its pinned staging's. A size past it is refused at start, where it would otherwise start and fail at the
# first eviction (issue 53: --kv-offload-host-bytes 1e15 became a MemoryError that killed the engine loop).
HOST_MEMORY_SHARE = 0.9


@dataclass
class TierStats:
    """Per tier: blocks stored, found and loaded back (with their bytes and seconds), pushed down or dropped; and
    the bytes stored since start and held now; `failed`: blocks dropped because the copy that wrote or read them
    failed (a step's tier work or a load reported failed: a full or failing disk), never served."""

    stored: int = 0
    hits: int = 0
    loaded_bytes: int = 0
    load_s: float = 0.0
    evicted: int = 0
    stored_bytes: int = 0
    held_bytes: int = 0
    failed: int = 0

    def add(self, other: "TierStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def scaled_bytes(self, n: int) -> "TierStats":
        """These counters with the byte counts times `n` (a TP group of n ranks, each moving one index's bytes)."""
        return replace(self, loaded_bytes=self.loaded_bytes * n, stored_bytes=self.stored_bytes * n,
                       held_bytes=self.held_bytes * n)


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def free_disk_bytes(disk_dir: str) -> int | None:
    """Free bytes this user may write on the filesystem `disk_dir` is on, or will be on once made (its nearest
    existing parent's); None where that cannot be read."""
    path = os.path.abspath(disk_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def host_bytes_excess(host_bytes: int) -> str | None:
    """Why `host_bytes` (one rank's host tier) is more than this machine can hold, or None when it is not."""
    mem = physical_memory_bytes()
    limit = None if mem is None else int(mem * HOST_MEMORY_SHARE)
    if limit is None or host_bytes <= limit:
        return None
    return (f"more than this machine can hold: at most {limit} bytes per rank ({HOST_MEMORY_SHARE:.0%} of its "
            f"{mem} bytes of physical memory)")


def disk_bytes_excess(disk_bytes: int, disk_dir: str) -> str | None:
    """Why `disk_bytes` (one rank's disk tier file, sparse: it fills as slots are written) is more than the free
    space under `disk_dir`, or None when it is not."""
    free = free_disk_bytes(disk_dir)
    if free is None or disk_bytes <= free:
        return None
    return f"more than the disk under {disk_dir!r} has free: at most {free} bytes (its filesystem's free space now)"


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class OffloadConfig:
    """`host_bytes`: the host tier's size per rank (> 0); `disk_bytes` and `disk_dir`: the disk tier's (0 / None:
    none). Each is rounded down to whole blocks once the rank's block size in bytes is known."""

    host_bytes: int = 4 << 30
    disk_bytes: int = 0
    disk_dir: str | None = None

    def __post_init__(self) -> None:
        if not _nonneg_int(self.host_bytes) or self.host_bytes < 1:
            raise ValueError(f"OffloadConfig.host_bytes={self.host_bytes!r} is invalid: must be an integer >= 1 "
                             "(bytes of host memory per rank; --kv-offload-host-bytes)")
        if not _nonneg_int(self.disk_bytes):
            raise ValueError(f"OffloadConfig.disk_bytes={self.disk_bytes!r} is invalid: must be an integer >= 0 "
                             "(bytes of disk per rank, 0: no disk tier; --kv-offload-disk-bytes)")
        if self.disk_bytes and not self.disk_dir:
            raise ValueError("OffloadConfig.disk_dir=None is invalid with disk_bytes > 0: name the disk tier's "
                             "directory (--kv-offload-dir)")
        if self.disk_dir is not None and not self.disk_bytes:
            raise ValueError(f"OffloadConfig.disk_dir={self.disk_dir!r} is invalid with disk_bytes=0: give the disk "
                             "tier's size too (--kv-offload-disk-bytes)")

    def check_machine(self) -> None:
        """ValueError when this machine cannot hold the tiers (physical memory, the disk directory's free space):
        called at start, before any weights load, and by each rank before it allocates its own."""
        why = host_bytes_excess(self.host_bytes)
        if why is not None:
            raise ValueError(f"OffloadConfig.host_bytes={self.host_bytes} is invalid: {why} "
                             "(--kv-offload-host-bytes).")
        why = disk_bytes_excess(self.disk_bytes, self.disk_dir) if self.disk_bytes else None
        if why is not None:
            raise ValueError(f"OffloadConfig.disk_bytes={self.disk_bytes} is invalid: {why} "
                             "(--kv-offload-disk-bytes).")

    def num_slots(self, block_bytes: int) -> tuple[int, int]:
        """(host slots, disk slots) for blocks of `block_bytes`; ValueError when the host tier holds no block."""
        host = self.host_bytes // block_bytes
        if host < 1:
            raise ValueError(f"OffloadConfig.host_bytes={self.host_bytes} is invalid for this model: one KV block "
                             f"takes {block_bytes} bytes (--kv-offload-host-bytes must hold at least one)")
        return host, self.disk_bytes // block_bytes

    def num_state_slots(self, state_bytes: int) -> int:
        """Host slots for linear-attention state checkpoints of `state_bytes` each (0 when `state_bytes` is 0):
        a quarter of the host tier, the rest is for blocks (`num_slots(block_bytes, state_bytes)`). States are
        megabytes where a block is kilobytes, so they get a share of their own rather than a block slot each."""
        return (self.host_bytes // 4) // state_bytes if state_bytes else 0

    def block_host_bytes(self, state_bytes: int) -> "OffloadConfig":
        """This config with the host bytes the state slots take removed (what `num_slots` divides into blocks)."""
        taken = self.num_state_slots(state_bytes) * state_bytes
        return self if not taken else replace(self, host_bytes=self.host_bytes - taken)


@dataclass(frozen=True)
class StepOps:
    """A step's tier work for the worker, run before the step's forward in this order: `demote` (host slot ->
    disk slot), then the device blocks `save_blocks` (evicted this step) into the host slots `save_slots`, then
    `save_states` (a device state checkpoint slot -> a host state slot).
    `seq` names it in the report; `block_bytes` is the scheduler's idea of one block, checked by the worker."""

    seq: int
    block_bytes: int
    demote: tuple[tuple[int, int], ...] = ()
    save_blocks: tuple[int, ...] = ()
    save_slots: tuple[int, ...] = ()
    # Linear-attention state: (device checkpoint slot, host state slot) copies, beside the blocks of the same step;
    # `state_bytes` the scheduler's idea of one state (0: none), checked by the worker as `block_bytes` is.
    save_states: tuple[tuple[int, int], ...] = ()
    state_bytes: int = 0


@dataclass(frozen=True)
class LoadPlan:
    """A request's blocks from `first_block` on: `promote` (disk slot -> host slot) first, then host slot
    `host_slots[i]` into the request's full-table entry `first_block + i` for i < `num_full` (-1: every slot is
    a full-table block), and the slots after those into its sliding-window table from entry `sliding_first` on
    (scheduler/sliding_kv.py: the window before the first recomputed token); `state_slot`: the host state slot
    holding the linear-attention state at the last block's end. `tier`: the lowest tier read (its load time). `first_block` is the device prefix hit the plan was made for: the worker refuses a transfer whose
    hit differs (the blocks would land one table entry off)."""

    seq: int
    host_slots: tuple[int, ...]
    promote: tuple[tuple[int, int], ...] = ()
    tier: str = "host"
    first_block: int = -1
    num_full: int = -1
    sliding_first: int = 0
    state_slot: int = -1  # the host state slot copied into the request's state slot (-1: none)

    @property
    def num_full_blocks(self) -> int:
        """The full-table blocks it loads (entries `first_block` .. + this): the request's KV from the tiers."""
        return len(self.host_slots) if self.num_full < 0 else self.num_full


class FreeSlots:
    """A tier's free slot numbers without a list of all of them: the ones given back (`append`, `extend`: taken
    again first, last in first out), then the never used ones, counted up from 0 (`pop`)."""

    def __init__(self, n: int) -> None:
        self.n, self._fresh, self._back = n, 0, []

    def __len__(self) -> int:
        return len(self._back) + self.n - self._fresh

    def __bool__(self) -> bool:
        return len(self) > 0

    def __contains__(self, s: int) -> bool:
        return self._fresh <= s < self.n or s in self._back

    def pop(self) -> int:
        if self._back:
            return self._back.pop()
        if self._fresh >= self.n:
            raise IndexError("pop from no free slots")
        self._fresh += 1
        return self._fresh - 1

    def append(self, s: int) -> None:
        self._back.append(s)

    def extend(self, slots) -> None:
        self._back.extend(slots)


class TierIndex:
    """One rank's tiers as slots and LRUs (module docstring). Not thread-safe: the scheduler's thread owns it."""

    def __init__(self, num_host: int, num_disk: int, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.num_host, self.num_disk = num_host, num_disk
        self.host: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, least recently used first
        self.disk: OrderedDict[bytes, int] = OrderedDict()
        # Free slots without a list of every slot number: nothing here grows with a tier's size (a size past the
        # machine is refused at start, OffloadConfig.check_machine; such a list would be the first to run out).
        self._free_host = FreeSlots(num_host)
        self._free_disk = FreeSlots(num_disk)
        self._host_pins: Counter = Counter()  # host slot -> pins (a load reads it; a step's work writes it)
        self._disk_pins: Counter = Counter()  # disk slot -> pins (a promotion reads it)
        self._demotes: list[tuple[int, int]] = []
        self._orphans: set[int] = set()  # host slots of dropped blocks, freed when their last pin goes
        self.stats = {tier: TierStats() for tier in TIERS}

    def __contains__(self, key: bytes) -> bool:
        return key in self.host or key in self.disk

    # ------------------------------------------------------------------ slots
    def _take_host_slot(self) -> int | None:
        if self._free_host:
            return self._free_host.pop()
        for key, slot in self.host.items():  # least recently used first
            if not self._host_pins[slot]:
                del self.host[key]
                self._count("host", evicted=1)
                self._push_down(key, slot)
                return slot
        return None  # every host slot is pinned by work in flight

    def _push_down(self, key: bytes, host_slot: int) -> None:
        if not self.num_disk or key in self.disk:
            return
        if self._free_disk:
            d = self._free_disk.pop()
        else:
            old = next((k for k, s in self.disk.items() if not self._disk_pins[s]), None)
            if old is None:
                return  # dropped: every disk slot is being read
            d = self.disk.pop(old)
            self._count("disk", evicted=1)
        self.disk[key] = d
        self._demotes.append((host_slot, d))
        self._count("disk", stored=1)

    def _count(self, tier: str, stored: int = 0, evicted: int = 0) -> None:
        st = self.stats[tier]
        st.stored += stored
        st.stored_bytes += stored * self.block_bytes
        st.evicted += evicted
        st.held_bytes = len(self.host if tier == "host" else self.disk) * self.block_bytes

    def pin(self, slots, n: int = 1) -> None:
        for s in slots:
            self._host_pins[s] += n
            if self._host_pins[s] <= 0:
                del self._host_pins[s]
                if s in self._orphans:
                    self._orphans.discard(s)
                    self._free_host.append(s)

    # ------------------------------------------------------------------ what the scheduler asks
    def num_leading(self, keys, start: int) -> int:
        """The end of the run of `keys` from `start` on that either tier holds."""
        n = start
        while n < len(keys) and keys[n] in self:
            n += 1
        return n

    def store(self, key: bytes) -> int | None:
        """The host slot (pinned) for a block the device pool just evicted, or None (held already, or no room)."""
        if key in self.host:
            self.host.move_to_end(key)
            return None
        if key in self.disk:
            return None  # its bytes are there already
        slot = self._take_host_slot()
        if slot is None:
            return None
        self.host[key] = slot
        self.pin([slot])
        self._count("host", stored=1)
        return slot

    def plan_load(self, keys, seq: int, **where) -> LoadPlan | None:
        """Pinned slots for `keys` (module docstring), or None, changing nothing but pushes down already queued,
        when one of them left the tiers or no host slot is free to stage a disk block in. `where`: the plan's
        `first_block`, `num_full` and `sliding_first` (LoadPlan)."""
        if not all(k in self for k in keys):
            return None
        # Every slot read is pinned first, so staging a disk block (which may push a host block down, and that a
        # disk block out) cannot take one of this load's own blocks.
        slots = {i: self.host[k] for i, k in enumerate(keys) if k in self.host}
        on_disk = {i: self.disk[k] for i, k in enumerate(keys) if i not in slots}
        self.pin(slots.values())
        for d in on_disk.values():
            self._disk_pins[d] += 1
        for k in keys:
            if k in self.host:
                self.host.move_to_end(k)
        staged = []
        for i in on_disk:
            s = self._take_host_slot()
            if s is None:  # undo: nothing of this load happens
                self.pin(slots.values(), -1)
                for d in on_disk.values():
                    self._disk_pins[d] -= 1
                self._free_host.extend(staged)
                return None
            staged.append(s)
        promote = []
        for i, s in zip(on_disk, staged):
            slots[i] = s
            self.pin([s])
            promote.append((on_disk[i], s))
        for i in on_disk:  # promoted: the host slot is theirs now (their disk slot once the load ends)
            del self.disk[keys[i]]
            self.host[keys[i]] = slots[i]
        for tier in TIERS:
            self._count(tier)
        return LoadPlan(seq, tuple(slots[i] for i in range(len(keys))), tuple(promote),
                        "disk" if promote else "host", **where)

    def load_ended(self, plan: LoadPlan, keys, ok: bool, seconds: float) -> None:
        """Unpin a load's slots (its promoted disk slots go free); count it per tier; a failed load's promoted
        blocks are dropped (their host slots may hold anything)."""
        self.pin(plan.host_slots, -1)
        for d, _ in plan.promote:
            self._disk_pins[d] -= 1
            if self._disk_pins[d] <= 0:
                del self._disk_pins[d]
            self._free_disk.append(d)
        if not ok:
            promoted = {h for _, h in plan.promote}
            lost = [k for k in keys if self.host.get(k) in promoted]
            self.stats["disk"].failed += len(lost)  # read from disk into host slots that may hold anything now
            self.drop(lost)
            return
        n_disk = len(plan.promote)
        for tier, n in (("host", len(plan.host_slots) - n_disk), ("disk", n_disk)):
            st = self.stats[tier]
            st.hits += n
            st.loaded_bytes += n * self.block_bytes
        self.stats[plan.tier].load_s += seconds

    def ops_ended(self, ops: StepOps, keys, demoted, ok: bool) -> None:
        """A step's tier work reported: its written slots unpinned; failed, what it stored or pushed down is dropped
        (`keys`: the saved blocks' keys, `demoted`: the pushed-down ones)."""
        self.pin(ops.save_slots, -1)
        if not ok:
            self._count_failed(list(keys) + list(demoted))
            self.drop(list(keys) + list(demoted))

    def _count_failed(self, keys) -> None:
        """`keys` are dropped because the copy that wrote them failed: counted in the tier that held them."""
        for k in keys:
            tier = "host" if k in self.host else "disk" if k in self.disk else None
            if tier is not None:
                self.stats[tier].failed += 1

    def take_demotes(self) -> tuple[tuple[int, int], ...]:
        out, self._demotes = tuple(self._demotes), []
        return out

    def drop(self, keys) -> None:
        """Forget `keys` in both tiers; their slots go free (a pinned host slot once its last pin goes)."""
        for k in keys:
            s = self.host.pop(k, None)
            if s is not None:
                (self._orphans.add if self._host_pins[s] else self._free_host.append)(s)
            d = self.disk.pop(k, None)
            if d is not None and not self._disk_pins[d]:
                self._free_disk.append(d)
        for tier in TIERS:
            self._count(tier)

    def clear(self) -> None:
        """Forget every block (the prefix cache was reset: the weights changed); pinned slots stay pinned."""
        self.drop(list(self.host) + list(self.disk))

    def num_pinned(self) -> int:
        """Slots held by work in flight (a load reading them, a step's copies writing them): 0 when idle."""
        return sum(1 for n in self._host_pins.values() if n > 0) + sum(1 for n in self._disk_pins.values() if n > 0)

    def check(self) -> None:
        """AssertionError if a slot is lost or held twice (tests)."""
        held = self.host.values()
        assert len(set(held)) == len(self.host) and not any(s in self._free_host for s in held)
        assert len(self.host) + len(self._free_host) + len(self._orphans) == self.num_host, "a host slot is lost"
        busy_disk = {d for d, n in self._disk_pins.items() if n > 0} - set(self.disk.values())
        assert len(self.disk) + len(self._free_disk) + len(busy_disk) == self.num_disk, "a disk slot is lost"


__all__ = ["FreeSlots", "HOST_MEMORY_SHARE", "LoadPlan", "OffloadConfig", "StepOps", "TIERS", "TierIndex", "TierStats",
           "disk_bytes_excess", "host_bytes_excess"]
