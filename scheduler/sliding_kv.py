"""KV blocks of a model whose sliding-window layers keep their own block table (gpt-oss; vLLM's hybrid KV
cache manager is the model).

The runner pairs sliding layer j with full layer j on one set of cache tensors, so one block id indexes the
cache of one layer per pair, and each id is handed to one group at a time from the one `BlockPool`. Every
request holds two tables: the full group's (append-only, as `KVCacheManager`) and the sliding group's, whose
entries turn NULL once no query can see them. Before a step whose first new position is p, sliding block b
is freed when (b + 1) * block_size <= p - window + 1: the query at p sees keys > p - window only, and every
later query sees less (`first_live_sliding_block`). The runner applies the same rule to its own copy of
the table, so only new ids cross to it.

Prefix caching: the sliding group registers its blocks under the full group's chain hash tagged
(`sliding_block_hash`). A hit of h = k blocks is usable only if the full group has blocks [0, k) and the
sliding group has every block the first new query can see, [first_live_sliding_block(h), k); k is
shortened until both hold. The sliding entries before that are NULL from the start.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

from .block_pool import BlockHash, extend_block_hashes
from .kv_cache_manager import NEVER_CACHED, KVCacheManager, known_written, cdiv
from .request import Request

# A sliding-table entry whose block was freed (or never needed): the runner maps it to its null block.
NULL_BLOCK = -1


def first_live_sliding_block(first_new_pos: int, window: int, block_size: int) -> int:
    """The first sliding block any query at or after `first_new_pos` can see; the blocks before it are free."""
    return max(0, (first_new_pos - window + 1) // block_size)


def sliding_block_hash(block_hash: BlockHash) -> BlockHash:
    """The sliding group's hash of a block: the full group's chain hash, tagged so the two never collide."""
    return hashlib.sha256(b"moelink-sliding-group" + block_hash).digest()


class SlidingHit(NamedTuple):
    """A prefix-cache hit of both groups: full ids [0, k) and the sliding table [0, k) (NULL where invisible)."""

    full: list[int]
    sliding: list[int]

    def __bool__(self) -> bool:
        return bool(self.full)


class SlidingKVCacheManager(KVCacheManager):
    """`KVCacheManager` with a second, sliding-window block table per request (module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, window: int,
                 max_chunk_tokens: int, block_hash_lookahead: int = 0) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, block_hash_lookahead)
        self.window = window
        self.max_chunk_tokens = max_chunk_tokens
        self._sliding: dict[str, list[int]] = {}
        self._num_freed: dict[str, int] = {}  # sliding entries before this are NULL
        self._num_cached_sliding: dict[str, int] = {}
        # Sliding ids the last allocate_slots appended (the scheduler sends them to the worker).
        self.last_new_sliding: list[int] = []

    # ------------------------------------------------- the scheduler's questions (KVCacheManager's)
    decode_tables = None  # every step frees out-of-window blocks first: always through allocate_slots

    def new_step_extras(self, cached) -> None:
        """The sliding ids the last allocate_slots appended ride with the step's CachedRequestData."""
        cached.new_sliding_block_ids = self.last_new_sliding

    def blocks_alone(self, num_tokens: int) -> int:
        return self.num_blocks_needed(num_tokens) + self.max_live_sliding_blocks(num_tokens)

    def fill_new_request(self, new) -> None:
        new.sliding_block_ids = list(self.get_sliding_block_ids(new.req_id))

    def transfer_tables(self, request_id: str, num_blocks: int) -> tuple[list[int], list[int]]:
        return (self.get_block_ids(request_id)[:num_blocks], self.get_sliding_block_ids(request_id)[:num_blocks])

    def check_request_blocks(self, req: Request) -> list[int]:
        super().check_request_blocks(req)
        sliding = self.get_sliding_block_ids(req.request_id)
        assert len(sliding) >= self.num_blocks_needed(req.num_computed_tokens), f"{req} lacks sliding blocks"
        return self.held_block_ids(req.request_id)

    # ----------------------------------------------------------------- queries
    def get_sliding_block_ids(self, request_id: str) -> list[int]:
        """The request's sliding table, NULL_BLOCK where freed (shared list: do not mutate)."""
        return self._sliding.get(request_id, [])

    def held_block_ids(self, request_id: str) -> list[int]:
        """Every block id the request holds a reference on, both groups."""
        return self.get_block_ids(request_id) + [b for b in self.get_sliding_block_ids(request_id) if b != NULL_BLOCK]

    def max_live_sliding_blocks(self, num_tokens: int) -> int:
        """An upper bound on the sliding blocks a step of a request of `num_tokens` tokens holds: a chunk of
        c <= max_chunk_tokens new tokens from p sees blocks first_live(p) .. ceil((p + c) / L) - 1."""
        return min(cdiv(num_tokens, self.block_size), cdiv(self.max_chunk_tokens + self.window, self.block_size) + 2)

    def max_tokens_alone(self) -> int:
        """The longest sequence (whole blocks) whose steps fit the pool with no other request running."""
        nb, bs = self.pool.num_blocks, self.block_size
        s = cdiv(self.max_chunk_tokens + self.window, bs) + 2
        max_full = nb - s if nb - s > s else min(s, nb // 2)
        return max(max_full, 0) * bs

    def get_computed_blocks(self, req: Request) -> tuple[SlidingHit, int]:  # type: ignore[override]  # opaque to the
        # scheduler, which hands the hit back to allocate_slots
        if not self.enable_prefix_caching:
            return SlidingHit([], []), 0
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        extend_block_hashes(req.block_hashes, req.all_token_ids, bs, max_blocks, self.lookahead, root=req.cache_root)
        full = self.pool.find_cached_blocks(req.block_hashes, max_blocks)
        for k in range(len(full), 0, -1):  # shorten the hit until the sliding group has its window
            s0 = first_live_sliding_block(k * bs, self.window, bs)
            tagged = [sliding_block_hash(h) for h in req.block_hashes[s0:k]]
            live = self.pool.find_cached_blocks(tagged)
            if len(live) == k - s0:
                return SlidingHit(full[:k], [NULL_BLOCK] * s0 + live), k * bs
        return SlidingHit([], []), 0

    # --------------------------------------------------------------- mutations
    def _free_out_of_window(self, rid: str, first_new_pos: int) -> None:
        sliding = self._sliding[rid]
        start = self._num_freed[rid]
        stop = min(first_live_sliding_block(first_new_pos, self.window, self.block_size), len(sliding))
        if stop <= start:
            return
        gone = [b for b in sliding[start:stop] if b != NULL_BLOCK]
        sliding[start:stop] = [NULL_BLOCK] * (stop - start)
        self._num_freed[rid] = stop
        self.pool.free(gone)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: SlidingHit | Sequence[int] = ()) -> list[int] | None:
        """As KVCacheManager.allocate_slots, for both groups: first frees the sliding blocks no query from
        `req.num_computed_tokens` on can see (always safe, so also when the allocation then fails), then
        takes the blocks both tables need. Returns the full group's new ids; the sliding group's are in
        `last_new_sliding`."""
        rid = req.request_id
        bs = self.block_size
        self.last_new_sliding = []
        hit = computed_blocks if isinstance(computed_blocks, SlidingHit) else SlidingHit([], [])
        blocks = self._blocks.get(rid)
        if blocks is not None:
            self._free_out_of_window(rid, req.num_computed_tokens)
        else:
            assert not hit or req.num_computed_tokens == 0, "prefix hits are only for fresh requests"
        held = len(blocks) if blocks is not None else 0
        sliding_held = len(self._sliding[rid]) if blocks is not None else 0
        end = req.num_computed_tokens + len(hit.full) * bs + num_new_tokens
        if not hit and held and end <= held * bs and end <= sliding_held * bs:
            return []  # a decode step inside the last block: no pool work beyond the frees
        need_blocks = cdiv(end, bs)
        need_full = need_blocks - held - len(hit.full)
        need_sliding = need_blocks - sliding_held - len(hit.sliding)
        hit_ids = hit.full + [b for b in hit.sliding if b != NULL_BLOCK]
        available = self.pool.num_free_blocks - self.pool.num_evictable(hit_ids)
        if need_full + need_sliding > available:
            return None
        if blocks is None:
            blocks = self._blocks[rid] = []
            self._sliding[rid] = []
            self.num_cached_blocks[rid] = len(hit.full)  # hits are cached already
            self._num_cached_sliding[rid] = len(hit.sliding)
            self._num_freed[rid] = hit.sliding.count(NULL_BLOCK)  # the leading entries no query sees
        if hit:
            self.pool.touch(hit_ids)
            blocks.extend(hit.full)
            self._sliding[rid].extend(hit.sliding)
        new_blocks = self.pool.allocate(need_full) if need_full > 0 else []
        new_sliding = self.pool.allocate(need_sliding) if need_sliding > 0 else []
        assert new_blocks is not None and new_sliding is not None
        blocks.extend(new_blocks)
        self._sliding[rid].extend(new_sliding)
        self.last_new_sliding = new_sliding
        return new_blocks

    def cache_blocks(self, req: Request, num_written: int | None = None) -> None:
        """Register both groups' full, computed blocks (freed sliding entries are skipped)."""
        if not self.enable_prefix_caching:
            return
        super().cache_blocks(req, num_written)
        rid = req.request_id
        sliding = self._sliding.get(rid)
        if sliding is None:
            return
        start = self._num_cached_sliding[rid]
        num_full = min(known_written(req, num_written) // self.block_size, len(sliding))
        if num_full <= start:
            return
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, num_full, self.lookahead, root=req.cache_root)
        num_full = min(num_full, len(req.block_hashes))  # with a lookahead, the next tokens must be known too
        if num_full <= start:
            return
        pairs = [(b, sliding_block_hash(h)) for b, h in zip(sliding[start:num_full], req.block_hashes[start:num_full])
                 if b != NULL_BLOCK]
        if pairs:
            self.pool.cache_full_blocks([b for b, _ in pairs], [h for _, h in pairs])
        self._num_cached_sliding[rid] = num_full

    def exclude_from_prefix_cache(self, req: Request) -> None:
        """As KVCacheManager's, for both groups."""
        super().exclude_from_prefix_cache(req)
        if req.request_id in self._num_cached_sliding:
            self._num_cached_sliding[req.request_id] = NEVER_CACHED

    def free(self, req: Request) -> None:
        """Release both tables' blocks (each tail first; see BlockPool.free)."""
        rid = req.request_id
        sliding = self._sliding.pop(rid, None)
        self._num_freed.pop(rid, None)
        self._num_cached_sliding.pop(rid, None)
        if sliding:
            self.pool.free([b for b in sliding if b != NULL_BLOCK])
        super().free(req)
