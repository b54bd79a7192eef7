"""BlockPool: allocation, ref counts, LRU eviction, prefix revival, invariants."""
import pytest

from moelink.scheduler import BlockPool, extend_block_hashes, hash_block_tokens


def _cache_seq(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for a whole sequence of full blocks and cache them."""
    n = len(tokens) // pool.block_size
    blocks = pool.allocate(n)
    pool.cache_full_blocks(blocks, extend_block_hashes([], tokens, pool.block_size))
    return blocks


def test_allocate_and_free_ref_counts():
    pool = BlockPool(4, 2, True)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    a = pool.allocate(3)
    assert a == [0, 1, 2] and [pool.ref_count(b) for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    assert pool.allocate(2) is None and pool.num_free_blocks == 1  # all or nothing
    pool.touch([0])  # shared by a second sequence
    pool.free(a)
    assert pool.ref_count(0) == 1 and pool.num_free_blocks == 3
    pool.free([0])
    assert pool.num_free_blocks == 4
    pool.check_invariants()
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([0])


def test_chain_hash_depends_on_whole_prefix():
    h1 = hash_block_tokens(None, [1, 2])
    assert h1 == hash_block_tokens(None, [1, 2])  # deterministic (sha256)
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4])
    # Incremental extension equals hashing from scratch; partial blocks are not hashed.
    hashes = extend_block_hashes([], [1, 2, 3], 2)
    assert len(hashes) == 1
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7], 2)
    assert hashes == extend_block_hashes([], [1, 2, 3, 4, 5, 6], 2) and len(hashes) == 3
    assert extend_block_hashes([], list(range(10)), 2, num_blocks=2) == extend_block_hashes([], list(range(4)), 2)


def test_prefix_lookup_and_revival():
    pool = BlockPool(6, 2, True)
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    blocks = _cache_seq(pool, seq)
    assert pool.find_cached_prefix(seq) == blocks
    assert pool.find_cached_prefix(seq[:5]) == blocks[:2]  # whole blocks only
    assert pool.find_cached_prefix([1, 2, 9, 9, 5, 6]) == blocks[:1]  # stops at the first miss
    assert pool.find_cached_prefix([0, 2, 3, 4]) == []
    pool.free(blocks)
    assert pool.num_free_blocks == 6
    # Freed but still findable; reviving takes them out of the free queue.
    hits = pool.find_cached_prefix(seq[:6])
    assert hits == blocks[:3]
    pool.touch(hits)
    assert [pool.ref_count(b) for b in hits] == [1, 1, 1] and pool.num_free_blocks == 3
    pool.check_invariants()
    # An allocation now cannot evict the revived blocks.
    fresh = pool.allocate(3)
    assert not set(fresh) & set(hits)
    # Free queue was [4, 5, 3]: the fresh blocks 4, 5 go first, then the tail block 3 is evicted.
    assert sorted(fresh) == [3, 4, 5] and pool.find_cached_prefix(seq) == blocks[:3]
    pool.check_invariants()


def test_lru_eviction_tail_first_and_uncached_first():
    pool = BlockPool(6, 2, True)
    scratch = pool.allocate(2)  # uncached blocks 0, 1
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    blocks = _cache_seq(pool, seq)  # blocks 2..5
    pool.free(blocks)  # tail first: 5, 4, 3, 2 from LRU to MRU
    pool.free(scratch)  # uncached: go to the LRU end, reused before any cached block
    assert pool.allocate(2) == [0, 1]
    assert pool.find_cached_prefix(seq) == blocks and pool.num_cached_blocks == 4
    # Each further allocation evicts the current tail of the cached sequence.
    for keep in (3, 2, 1, 0):
        (b,) = pool.allocate(1)
        assert b == blocks[keep]
        assert pool.find_cached_prefix(seq) == blocks[:keep]
        assert pool.block_hash(b) is None
        pool.check_invariants()
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 0


def test_least_recently_freed_is_evicted_first():
    pool = BlockPool(4, 2, True)
    a = _cache_seq(pool, [1, 1, 1, 1])
    b = _cache_seq(pool, [2, 2, 2, 2])
    pool.free(a)
    pool.free(b)  # b freed later: more recent
    assert pool.allocate(2) == a[::-1]
    assert pool.find_cached_prefix([2, 2, 2, 2]) == b and pool.find_cached_prefix([1, 1]) == []


def test_duplicate_hash_keeps_first_copy():
    pool = BlockPool(4, 2, True)
    a = _cache_seq(pool, [5, 6])
    b = _cache_seq(pool, [5, 6])  # computed twice in one step by two requests
    assert pool.block_hash(a[0]) is not None and pool.block_hash(b[0]) is None
    assert pool.find_cached_prefix([5, 6]) == a
    pool.cache_full_blocks(a, extend_block_hashes([], [5, 6], 2))  # re-registering is a no-op
    pool.check_invariants()


def test_reset_and_disabled_prefix_cache():
    pool = BlockPool(4, 2, True)
    blocks = _cache_seq(pool, [1, 2, 3, 4])
    pool.free(blocks[1:])
    assert pool.reset_prefix_cache() == 2
    assert pool.find_cached_prefix([1, 2, 3, 4]) == [] and pool.num_cached_blocks == 0
    pool.check_invariants()

    off = BlockPool(4, 2, False)
    blocks = _cache_seq(off, [1, 2, 3, 4])
    assert off.num_cached_blocks == 0 and off.find_cached_prefix([1, 2, 3, 4]) == []
    off.record_prefix_query(4, 0)
    assert off.prefix_cache_queries == 0
    off.check_invariants()


def test_counters():
    pool = BlockPool(4, 2, True)
    pool.record_prefix_query(10, 4)
    pool.record_prefix_query(6, 0)
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (16, 4)


def test_invariant_check_catches_corruption():
    pool = BlockPool(4, 2, True)
    pool.allocate(1)
    pool._ref_cnt[0] = 0  # referenced nowhere yet not in the free queue
    with pytest.raises(AssertionError, match="block 0: ref 0 but in free queue: False"):
        pool.check_invariants()
    pool = BlockPool(4, 2, True)
    pool._ref_cnt[2] = -1
    with pytest.raises(AssertionError, match="block 2 has ref count -1"):
        pool.check_invariants()
    pool = BlockPool(4, 2, True)
    pool._free[7] = None  # an id past the pool
    with pytest.raises(AssertionError, match="unknown block ids"):
        pool.check_invariants()
    pool = BlockPool(4, 2, True)
    _cache_seq(pool, [1, 2])
    pool._block_hash[0] = None  # map and block disagree
    with pytest.raises(AssertionError):
        pool.check_invariants()
