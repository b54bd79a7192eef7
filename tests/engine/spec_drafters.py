"""Test drafters for speculative decoding (module-level, so a functools.partial of one pickles to Ray ranks)."""
from __future__ import annotations

import random


class OracleDrafter:
    """Proposes a request's known continuation (`reference[prompt]`, e.g. its greedy output without
    speculation), each draft right with probability `p` and otherwise a wrong token: a drafter of chosen
    acceptance. Requests without a reference draft nothing."""

    def __init__(self, reference: dict[tuple, list[int]], p: float, vocab: int, seed: int = 0):
        self.reference, self.p, self.vocab = reference, p, vocab
        self.rng = random.Random(seed)

    def propose(self, states, k: int) -> list[list[int]]:
        out = []
        for st in states:
            ref = self.reference.get(tuple(st.prompt_token_ids))
            pos = len(st.output_token_ids)
            drafts = []
            if ref is not None:
                for t in ref[pos: pos + k]:
                    drafts.append(t if self.rng.random() < self.p else (t + 1) % self.vocab)
            out.append(drafts)
        return out
