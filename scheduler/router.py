"""Data-parallel request router: which rank's scheduler takes a new request.

Pure Python. Every rank runs attention for its own requests (DP attention),
so a request's rank decides where its KV lives and whose step it lengthens.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class _RankScheduler(Protocol):
    def outstanding_tokens(self) -> int: ...

    def num_cached_prefix_tokens(self, token_ids: list[int], cache_salt: bytes = b"") -> int: ...


class LeastLoadedRouter:
    """Least outstanding work, with prefix-cache hits counted as work already done.

    cost(rank) = outstanding_tokens(rank) + prompt_len − cached_prefix(rank, prompt)
    Ties go to the lowest rank, so routing is deterministic.
    """

    def __init__(self, schedulers: Sequence[_RankScheduler]):
        if not schedulers:
            raise ValueError("LeastLoadedRouter needs at least one scheduler.")
        self.schedulers = list(schedulers)

    def route(self, prompt_token_ids: list[int], cache_salt: bytes = b"") -> int:
        if len(self.schedulers) == 1:
            return 0
        n = len(prompt_token_ids)
        costs = [s.outstanding_tokens() + n - s.num_cached_prefix_tokens(prompt_token_ids, cache_salt) for s in self.schedulers]
        return min(range(len(costs)), key=lambda r: (costs[r], r))
