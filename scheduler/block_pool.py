"""Paged KV block pool with ref-counted prefix caching.

A block holds the KV of `block_size` consecutive tokens of one sequence. Full
blocks can be *cached*: registered under a chain hash of their tokens and of
every token before them, so that a later request with the same prefix reuses
them instead of recomputing. Several running requests may share a cached block
(its ref count is the number of requests holding it).

A block whose ref count drops to 0 goes to the free queue but keeps its hash:
it can be revived by a prefix hit until an allocation needs a fresh block and
evicts it. The queue is LRU-ordered (front = evicted next). Blocks without a
hash hold nothing reusable, so they go to the front and are taken first;
cached blocks go to the back, so the least recently freed is evicted first.

A KV offload tier (engine/kv_transfer/offload.py) is fed by those evictions: while `evicted` is a list (None, the
default, records nothing), `allocate` appends (block id, hash) for each cached block it hands out, so the block's
KV can be copied below the device before the step that received it overwrites it; `num_resets` counts
`reset_prefix_cache` calls, after which whatever a tier holds is stale too.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes

# Parent of the first block of every sequence. A fixed value (not a
# per-process random seed) so that another process, e.g. the data-parallel
# router estimating prefix hits, computes the same hashes.
ROOT_BLOCK_HASH: BlockHash = hashlib.sha256(b"moelink-kv-block-root").digest()


def root_block_hash(cache_salt: bytes = b"") -> BlockHash:
    """Parent of a sequence's first block: ROOT_BLOCK_HASH, or, for a request with a cache salt, a root of its own.

    The salt holds what its KV depends on besides the token ids (a LoRA adapter, the images behind placeholder
    tokens, a tenant's `cache_salt`): requests with different salts share no block, whatever their tokens, and
    equal salts share as plain prompts do. Each feature adds its own tagged part (`Request.cache_salt`)."""
    if not cache_salt:
        return ROOT_BLOCK_HASH
    return hashlib.sha256(ROOT_BLOCK_HASH + cache_salt).digest()


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      root: BlockHash = ROOT_BLOCK_HASH) -> BlockHash:
    """Chain hash of one full block: sha256(parent hash ‖ token ids as int64).

    Why sha256 rather than Python's `hash((parent, tuple(tokens)))`: tuple
    hashes are 64-bit and not collision resistant, so a crafted prompt could
    collide with another user's prefix and be served their KV (the vLLM
    advisory GHSA-rm76-4mrf-v9r8 / CVE-2025-25183); sha256 also gives the same
    value in every process. It costs ~1 µs per block, paid once per block.
    """
    h = hashlib.sha256(root if parent_hash is None else parent_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        num_blocks: int | None = None, lookahead: int = 0,
                        root: BlockHash = ROOT_BLOCK_HASH) -> list[BlockHash]:
    """Append hashes of the full blocks of `token_ids` not yet in `hashes`.

    Incremental: only blocks `len(hashes) .. num_blocks-1` are hashed (all full
    blocks when `num_blocks` is None), so calling this every step after a token
    is appended costs O(new blocks), not O(sequence). Returns `hashes`.
    `lookahead`: tokens after each block its hash covers too (CacheConfig.block_hash_lookahead); a block is
    hashed only once they are known. `root`: the chain's first parent (`root_block_hash` of the request's salt).
    """
    full = max(len(token_ids) - lookahead, 0) // block_size
    stop = full if num_blocks is None else min(num_blocks, full)
    for i in range(len(hashes), stop):
        parent = hashes[i - 1] if i > 0 else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size + lookahead], root))
    return hashes


class BlockPool:
    """A fixed set of KV block ids `0 .. num_blocks-1` with ref counts and a
    hash → block map for prefix caching.

    Not thread-safe: owned by one scheduler.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt: list[int] = [0] * num_blocks
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # OrderedDict as an LRU queue with O(1) removal from the middle (a
        # prefix hit revives a block wherever it sits).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Counters in tokens, monotonically increasing (for hit-rate metrics).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # The offload tier's feed (module docstring): None records nothing.
        self.evicted: list[tuple[int, BlockHash]] | None = None
        self.num_resets = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not: what `allocate` can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def ref_counts(self) -> list[int]:
        """Every block's reference count, by block id (a copy; for invariant checks)."""
        return list(self._ref_cnt)

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hash[block_id]

    def find_cached_blocks(self, block_hashes: Sequence[BlockHash], max_blocks: int | None = None) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes` (at most
        `max_blocks`). Does not take references: call `touch` to keep them."""
        if not self.enable_prefix_caching:
            return []
        n = len(block_hashes) if max_blocks is None else min(max_blocks, len(block_hashes))
        hits: list[int] = []
        for i in range(n):
            block_id = self._cached.get(block_hashes[i])
            if block_id is None:
                break  # chain hashing: nothing after a miss can match
            hits.append(block_id)
        return hits

    def find_cached_prefix(self, token_ids: Sequence[int], root: BlockHash = ROOT_BLOCK_HASH) -> list[int]:
        """Block ids of the longest cached prefix of a token list (whole blocks)."""
        if not self.enable_prefix_caching:
            return []
        return self.find_cached_blocks(extend_block_hashes([], token_ids, self.block_size, root=root))

    def num_evictable(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` sit in the free queue (ref 0): touching them
        removes them from what `allocate` can use."""
        return sum(1 for b in block_ids if self._ref_cnt[b] == 0)

    # --------------------------------------------------------------- mutations
    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` fresh blocks (ref 1), evicting cached ones from the
        LRU end as needed. Returns None, changing nothing, if too few are free."""
        if num_blocks > len(self._free):
            return None
        out: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            h = self._block_hash[block_id]
            if h is not None:  # evict: its KV is about to be overwritten
                del self._cached[h]
                self._block_hash[block_id] = None
                if self.evicted is not None:
                    self.evicted.append((block_id, h))
            self._ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (prefix hits); a free cached
        block is revived, i.e. leaves the free queue."""
        for b in block_ids:
            if self._ref_cnt[b] == 0:
                del self._free[b]
            self._ref_cnt[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block of one sequence, given in sequence
        order. Released tail first, so that under LRU the end of a sequence is
        evicted before its start (its start is the likelier shared prefix)."""
        for b in reversed(block_ids):
            ref = self._ref_cnt[b] - 1
            if ref < 0:
                raise RuntimeError(f"KV block {b} freed more often than allocated.")
            self._ref_cnt[b] = ref
            if ref == 0:
                self._free[b] = None
                if self._block_hash[b] is None:
                    self._free.move_to_end(b, last=False)  # nothing to keep: reuse first

    def cache_full_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> None:
        """Register full blocks (whose KV is computed) under their chain hashes.

        A block that already has a hash is skipped (e.g. it came from a prefix
        hit). If another block already holds the same hash (two requests with
        the same prefix computed it in the same step) the first one stays the
        cached copy and this block stays unhashed; its KV is identical anyway.
        """
        if not self.enable_prefix_caching:
            return
        for b, h in zip(block_ids, block_hashes):
            if self._block_hash[b] is not None or h in self._cached:
                continue
            self._block_hash[b] = h
            self._cached[h] = b

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix-cache lookup (in tokens) for the hit-rate metric."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after weights change). Blocks in use
        stay allocated; only their reusability is dropped. Returns how many
        hashes were dropped."""
        n = len(self._cached)
        self.num_resets += 1
        for b in self._cached.values():
            self._block_hash[b] = None
        self._cached.clear()
        return n

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests):
        every block is either referenced or in the free queue exactly once, and
        the hash map and per-block hashes mirror each other."""
        free = self._free  # an OrderedDict cannot hold a key twice
        # Whole-list checks first (the scheduler tests call this after every step: a loop over every block in Python
        # was a third of their time); the block-by-block walk only to name what is wrong.
        if min(self._ref_cnt, default=0) < 0 or free.keys() != {b for b, r in enumerate(self._ref_cnt) if r == 0}:
            for b in range(self.num_blocks):
                ref = self._ref_cnt[b]
                assert ref >= 0, f"block {b} has ref count {ref}"
                assert (ref == 0) == (b in free), f"block {b}: ref {ref} but in free queue: {b in free}"
            raise AssertionError("free queue holds unknown block ids")
        for h, b in self._cached.items():
            assert self._block_hash[b] == h, f"hash map points at block {b}, which holds another hash"
        hashed = sum(1 for h in self._block_hash if h is not None)
        assert hashed == len(self._cached), f"{hashed} blocks carry a hash but the map holds {len(self._cached)}"
        if not self.enable_prefix_caching:
            assert not self._cached, "prefix caching is off but blocks are cached"
