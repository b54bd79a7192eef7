"""Per-request view of the block pool: which blocks each request holds.

The scheduler decides *who* runs; this module turns "request r computes n more
tokens" into block allocations, prefix-cache lookups and cache registration,
keeping the per-request bookkeeping incremental (O(new blocks) per call).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .block_pool import BlockPool, extend_block_hashes
from .outputs import CachedRequestData
from .request import Request


NEVER_CACHED = 1 << 62  # a request's num_cached_blocks past any table: its blocks are never registered


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def known_written(req: Request, num_written: int | None) -> int:
    """Tokens whose KV is written and whose ids are known (hashable)."""
    written = req.num_computed_tokens if num_written is None else num_written
    return min(written, req.num_tokens)


class KVCacheManager:
    """Owns the `BlockPool` and the block table of every request holding blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 block_hash_lookahead: int = 0) -> None:
        """block_hash_lookahead: tokens after a block its hash covers (CacheConfig.block_hash_lookahead)."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.lookahead = block_hash_lookahead
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._blocks: dict[str, list[int]] = {}
        # How many leading blocks of a request are registered (or known to be
        # registered) in the prefix cache; caching resumes from there. Read-only outside: the scheduler reads it
        # to skip `cache_blocks` for the (common) steps that fill no block.
        self.num_cached_blocks: dict[str, int] = {}

    # -- what the scheduler asks of its KV policy (scheduler/sliding_kv.py's manager answers differently) -----
    @property
    def decode_tables(self) -> dict[str, list[int]] | None:
        """Every holding request's block table, by id (shared: do not mutate): a decode step whose tokens fit
        the last block needs no `allocate_slots` call (the scheduler's hot loop checks it first). None when
        every step must go through `allocate_slots`."""
        return self._blocks

    # Fills the worker-bound record of a scheduled request with what this policy adds to a step (None:
    # nothing; `new_step_extras` is the per-step form, called only when set).
    new_step_extras: Callable[[CachedRequestData], None] | None = None

    def max_tokens_alone(self) -> int:
        """The longest sequence whose KV fits the pool with no other request running."""
        return self.pool.num_blocks * self.block_size

    def blocks_alone(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` tokens may hold at once."""
        return self.num_blocks_needed(num_tokens)

    def fill_new_request(self, new) -> None:
        """Add this policy's tables to a NewRequestData (the full table is already in it)."""

    def transfer_tables(self, request_id: str, num_blocks: int) -> tuple[list[int], list[int]]:
        """Copies of the request's first `num_blocks` table entries for a KV transfer (scheduler/kv_connector.py):
        (full group, sliding group; empty when one table serves every layer)."""
        return self.get_block_ids(request_id)[:num_blocks], []

    def check_request_blocks(self, req: Request) -> list[int]:
        """AssertionError if a running request lacks blocks for what it computed; returns every block id it holds
        a reference on (for the pool's ref-count check)."""
        blocks = self.get_block_ids(req.request_id)
        assert len(blocks) >= self.num_blocks_needed(req.num_computed_tokens), f"{req} lacks blocks"
        return blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (shared list: do not mutate)."""
        return self._blocks.get(request_id, [])

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of a request that holds no blocks yet.

        Returns (block ids, number of hit tokens). At most `num_tokens - 1`
        tokens may hit: the last token must be computed to produce logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, max_blocks, self.lookahead, root=req.cache_root)
        hits = self.pool.find_cached_blocks(req.block_hashes, max_blocks)
        return hits, len(hits) * self.block_size

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Make room for `num_new_tokens` tokens after the computed ones.

        `computed_blocks` are prefix hits for a request that holds no blocks
        yet (`req.num_computed_tokens` must then be 0); they are referenced
        before fresh blocks are taken so the allocation cannot evict them.
        Returns the newly allocated block ids (possibly empty), or None,
        changing nothing, if the pool cannot supply them.
        """
        rid = req.request_id
        blocks = self._blocks.get(rid)
        held = len(blocks) if blocks is not None else 0
        if not computed_blocks and held and (req.num_computed_tokens + num_new_tokens) <= held * self.block_size:
            return []  # the common decode step: the last block still has room (no pool work at all)
        if computed_blocks:
            assert held == 0 and req.num_computed_tokens == 0, "prefix hits are only for fresh requests"
        computed_tokens = req.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.num_blocks_needed(computed_tokens + num_new_tokens) - held - len(computed_blocks)
        # Touching a hit block that sits in the free queue takes it out of
        # what `allocate` can hand out.
        available = self.pool.num_free_blocks - self.pool.num_evictable(computed_blocks)
        if need > available:
            return None
        if blocks is None:
            blocks = self._blocks[rid] = []
            self.num_cached_blocks[rid] = len(computed_blocks)  # hits are cached already
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(need) if need > 0 else []
        assert new_blocks is not None
        blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, req: Request, num_written: int | None = None) -> None:
        """Register the request's blocks that are full of computed tokens.

        Call only once the KV of those tokens is really written (after the step ran): a cached block may be
        read by anyone. `num_written`: the tokens whose KV is written (default `req.num_computed_tokens`; an
        overlapped loop has scheduled the next step already, so it passes where the finished step ended).
        Only tokens the request knows are hashed: a block holding a token still in flight is not full yet.
        """
        if not self.enable_prefix_caching:
            return
        rid = req.request_id
        blocks = self._blocks.get(rid)
        if blocks is None:
            return
        start = self.num_cached_blocks[rid]
        num_full = min(known_written(req, num_written) // self.block_size, len(blocks))
        if num_full <= start:
            return
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, num_full, self.lookahead, root=req.cache_root)
        num_full = min(num_full, len(req.block_hashes))  # with a lookahead, the next tokens must be known too
        if num_full <= start:
            return
        self.pool.cache_full_blocks(blocks[start:num_full], req.block_hashes[start:num_full])
        self.num_cached_blocks[rid] = num_full

    def exclude_from_prefix_cache(self, req: Request) -> None:
        """Never register `req`'s blocks for prefix reuse from now on (its KV came from where nothing vouches for
        it: a KV load from an unauthenticated source, scheduler/kv_connector.py); they are its own alone."""
        if req.request_id in self.num_cached_blocks:
            self.num_cached_blocks[req.request_id] = NEVER_CACHED

    def free(self, req: Request) -> None:
        """Release all blocks of a request (tail first; see BlockPool.free)."""
        blocks = self._blocks.pop(req.request_id, None)
        self.num_cached_blocks.pop(req.request_id, None)
        if blocks:
            self.pool.free(blocks)

    @property
    def num_requests_holding_blocks(self) -> int:
        return len(self._blocks)

    def reset_prefix_cache(self) -> int:
        """Forget all cached prefixes; returns how many blocks were cached."""
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """What this policy keeps beside the pool (the pool's own invariants are checked by the scheduler)."""

    # A policy whose chunks must end at certain positions (hybrid_cache.py) sets these; None: no such rule.
    chunk_limit = None
    plan_step = None
    step_taken = None
    steps_dropped = None
