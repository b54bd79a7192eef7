from moelink.scheduler.router import LeastLoadedRouter


class FakeRank:
    def __init__(self, load, cached=0):
        self.load, self.cached = load, cached

    def outstanding_tokens(self):
        return self.load

    def num_cached_prefix_tokens(self, ids, cache_salt=b""):
        return min(self.cached, len(ids))


def test_least_loaded_wins_and_ties_go_low():
    r = LeastLoadedRouter([FakeRank(100), FakeRank(10), FakeRank(10)])
    assert r.route([1] * 5) == 1


def test_prefix_hits_count_as_done_work():
    # Rank 0 is busier by 40 tokens but holds 64 of the prompt's tokens.
    r = LeastLoadedRouter([FakeRank(50, cached=64), FakeRank(10)])
    assert r.route([1] * 80) == 0
    r = LeastLoadedRouter([FakeRank(90, cached=64), FakeRank(10)])
    assert r.route([1] * 80) == 1


def test_with_real_schedulers_balances_and_sees_cache():
    from moelink.scheduler import CacheConfig, Request, Scheduler, SchedulerConfig

    scheds = [Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256),
                        CacheConfig(block_size=4, num_kv_blocks=64)) for _ in range(2)]
    router = LeastLoadedRouter(scheds)
    placed = []
    for i in range(4):
        rank = router.route([i] * 10)
        scheds[rank].add_request(Request(f"r{i}", [i] * 10, None, max_tokens=5))
        placed.append(rank)
    assert placed == [0, 1, 0, 1]
