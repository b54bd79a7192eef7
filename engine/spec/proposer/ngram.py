"""Prompt-lookup drafting (`"method": "ngram"`): propose the tokens that followed the last time the request's
own recent tokens appeared. No weights, no device work: one search over the request's token ids on the host.

For n from `prompt_lookup_max` down to `prompt_lookup_min`, the request's last n tokens are looked up earlier in
its tokens (prompt and output); the most recent earlier occurrence wins (the nearest context is the likeliest to
repeat: code edits, quoted passages, lists), and the up to k tokens after it are the draft. The longest n that
matches is used; no match drafts nothing (the request then verifies zero drafts: an ordinary decode row).
"""
from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int, prompt_lookup_min: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"NgramProposer: prompt_lookup_min={prompt_lookup_min} and prompt_lookup_max="
                             f"{prompt_lookup_max} must satisfy 1 <= min <= max.")
        self.k = num_speculative_tokens
        self.n_max = prompt_lookup_max
        self.n_min = prompt_lookup_min

    def propose(self, token_ids: np.ndarray, max_tokens: int | None = None) -> list[int]:
        """The draft for one request whose tokens so far are `token_ids` (int array); at most `max_tokens`
        (what its length limits leave), at most k."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        L = len(token_ids)
        if k <= 0 or L < self.n_min + 1:
            return []
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            start = _last_earlier_match(token_ids, n)
            if start is not None:
                follow = token_ids[start + n: start + n + k]
                return [int(t) for t in follow]
        return []

    def propose_batch(self, token_ids: list[np.ndarray], max_tokens: list[int | None]) -> list[list[int]]:
        return [self.propose(t, m) for t, m in zip(token_ids, max_tokens)]


def _last_earlier_match(token_ids: np.ndarray, n: int) -> int | None:
    """Start of the most recent occurrence of the last n tokens that ends before the last token (so at least
    one token follows it), or None."""
    L = len(token_ids)
    suffix = token_ids[L - n:]
    # Windows ending at index <= L - 2: starts 0 .. L - n - 1.
    if L - n < 1:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(token_ids[: L - 1], n)
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    return int(hits[-1]) if hits.size else None
