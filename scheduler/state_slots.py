"""Fixed-size per-sequence state (linear attention's recurrent and convolution state): slots, and checkpoints of
it at block boundaries for prefix caching.

A linear-attention layer keeps no per-token KV: each sequence carries one state of a fixed size, updated in place
by every token. The worker keeps, per such layer, one tensor of `num_slots + num_checkpoints + 1` states (the last
a null slot that padded rows of a CUDA graph read and write); the scheduler hands out the indices:

- a *sequence slot* to every request from its admission to its end (finish, abort, preemption, a failed KV
  load): [0, num_slots). A request with no slot free is not admitted (as with no KV block free).
- a *checkpoint slot*, [num_slots, num_slots + num_checkpoints), holds a copy of some sequence's state right
  after a block boundary of its prompt, registered under that block's chain hash (scheduler/block_pool.py) once
  the step that wrote it is taken. A later request whose prompt hits the prefix cache up to that block starts
  from a copy of it instead of recomputing the prefix (SGLang's MambaRadixCache keeps states the same way:
  at the nodes where a prefill ended, not at every token).

The worker applies a step's copies in a fixed order: copies into sequence slots (prefix hits) before the
forward, copies into checkpoint slots (saves) after it. So a checkpoint evicted and re-used for a save in the
same step as a hit reads it is read first; and a save becomes a hit only once its step was taken
(`StateCheckpoints.commit`), after the step that wrote it has run.

Legend: none (indices only; pure Python, no torch).
"""
from __future__ import annotations

from collections import OrderedDict

from .block_pool import BlockHash


class StateSlots:
    """The sequence slots [0, num_slots): one per request holding state."""

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"StateSlots num_slots={num_slots!r} is invalid: must be an integer >= 1.")
        self.num_slots = num_slots
        # Lowest first, so a lightly loaded engine touches few slots (and tests read stable numbers).
        self._free = list(range(num_slots - 1, -1, -1))
        self._owner: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def get(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def take(self, request_id: str) -> int | None:
        """The request's slot, taken now if it holds none; None when every slot is held."""
        slot = self._owner.get(request_id)
        if slot is None and self._free:
            slot = self._owner[request_id] = self._free.pop()
        return slot

    def release(self, request_id: str) -> None:
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
            self._free.sort(reverse=True)

    def holders(self) -> dict[str, int]:
        return dict(self._owner)

    def check_invariants(self) -> None:
        held = list(self._owner.values())
        assert len(set(held)) == len(held), "a state slot held twice"
        assert sorted(held + self._free) == list(range(self.num_slots)), "state slots lost or duplicated"


class StateCheckpoints:
    """Checkpoint slots [first, first + num): LRU over the registered ones; a slot reserved for a save is not
    evicted before its step is taken (`commit` registers it, `abandon` gives it back)."""

    def __init__(self, first: int, num: int) -> None:
        if not isinstance(num, int) or isinstance(num, bool) or num < 0:
            raise ValueError(f"StateCheckpoints num={num!r} is invalid: must be an integer >= 0.")
        self.first, self.num = first, num
        self._free = list(range(first + num - 1, first - 1, -1))
        self._by_hash: OrderedDict[BlockHash, int] = OrderedDict()  # LRU: front is evicted first
        self._hash_of: dict[int, BlockHash] = {}
        self._pending: dict[int, BlockHash] = {}  # slot -> the hash it will hold once its step is taken
        self._tail_slots: set[int] = set()  # slots reserved or registered as tails (reserve(tail=True))
        self.num_saved = 0
        self.num_hits = 0

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The checkpoint slot holding the state right after the block of `block_hash`, or None; a hit counts as a
        use (moves it to the back of the LRU order)."""
        slot = self._by_hash.get(block_hash)
        if slot is not None:
            self._by_hash.move_to_end(block_hash)
        return slot

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._by_hash or block_hash in self._pending.values()

    def reserve(self, block_hash: BlockHash | None, tail: bool = False) -> int | None:
        """A slot to save into for `block_hash` (a free one, else the least recently used registered one); None
        when every slot is pending (or there are none). A `tail` (a decoding request's rolling save: a one-off
        resume point) evicts only another tail, never a prompt's checkpoint (which every request sharing that
        prefix resumes from): None when no free slot and no tail is there."""
        if self._free:
            slot = self._free.pop()
        elif self._by_hash:
            old_hash = next((h for h, s in self._by_hash.items() if s in self._tail_slots), None) if tail \
                else next(iter(self._by_hash))
            if old_hash is None:
                return None
            slot = self._by_hash.pop(old_hash)
            del self._hash_of[slot]
            self._tail_slots.discard(slot)
        else:
            return None
        self._pending[slot] = block_hash
        if tail:
            self._tail_slots.add(slot)
        return slot

    def commit(self, slot: int, block_hash: BlockHash | None = None) -> None:
        """The step that saved into `slot` was taken: the checkpoint is a hit from now on. `block_hash`: the key,
        for a save reserved before its block's tokens were known (reserve(None): a decode step's)."""
        pending = self._pending.pop(slot)
        block_hash = pending if block_hash is None else block_hash
        old = self._by_hash.pop(block_hash, None)
        if old is not None:  # the same prefix saved twice (two requests at once): keep the newer, free the older
            del self._hash_of[old]
            self._tail_slots.discard(old)
            self._free.append(old)
        self._by_hash[block_hash] = slot
        self._hash_of[slot] = block_hash
        self.num_saved += 1

    def discard(self, slot: int, block_hash: BlockHash) -> None:
        """Forget the checkpoint `slot` holds if it still holds `block_hash` (not evicted and reused since)."""
        if self._hash_of.get(slot) == block_hash:
            del self._by_hash[block_hash], self._hash_of[slot]
            self._tail_slots.discard(slot)
            self._free.append(slot)

    def abandon(self, slot: int) -> None:
        """The step that was to save into `slot` never ran (a rewind): the slot is free again."""
        if slot in self._pending:
            del self._pending[slot]
            self._tail_slots.discard(slot)
            self._free.append(slot)

    def clear(self) -> int:
        """Forget every registered checkpoint (a weight update: the states are of the old weights)."""
        n = len(self._by_hash)
        for slot in self._by_hash.values():
            self._free.append(slot)
            self._tail_slots.discard(slot)
        self._by_hash.clear()
        self._hash_of.clear()
        return n

    def check_invariants(self) -> None:
        slots = list(self._by_hash.values()) + list(self._pending) + self._free
        assert sorted(slots) == list(range(self.first, self.first + self.num)), "checkpoint slots lost or duplicated"
        assert {s: h for h, s in self._by_hash.items()} == self._hash_of
        assert self._tail_slots <= set(self._by_hash.values()) | set(self._pending), "a tail slot neither held nor pending"


__all__ = ["StateCheckpoints", "StateSlots"]
