"""Structured output on xgrammar: grammars compiled off the engine thread, one matcher per request.

Where the work happens, and why:
- Compiling (`GrammarCompilerPool`, engine/core/grammar_compile.py) runs in child processes with their own
  bounded queue, a size and a time limit, and cancellation when every client of a compile has left. A
  request whose grammar is compiling waits before it reaches the scheduler (`LLM`'s caller in
  `process_inputs`; a server handler awaits it on its event loop), while the loop steps everything else.
  Equal specs share one compile. A spec that does not compile is a ValueError naming its field, as any
  other bad input.
- The token bitmask is computed on the engine thread (`StructuredOutputManager.bitmasks`), per request
  scheduled this step, from the request's `GrammarMatcher`, and travels to each rank in its own
  `SchedulerOutput.grammar_bitmask` (as vLLM v1 does): the engine is the one place that sees every
  sampled token in order, and under expert parallelism each rank only needs its own rows. The worker's
  sampler turns it into a mask on the logits before sampling (engine/rank/sampler.py).
- The matcher advances by the tokens the scheduler accepted (`accept`). A preempted request keeps its
  output tokens (recompute), so its matcher stays right; a finished or aborted one is dropped.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from .grammar_compile import GrammarCompilerPool, GrammarQueueFull  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit t of word t // 32: token t allowed)."""
    return -(-vocab_size // 32)


class StructuredOutputManager:
    """One xgrammar GrammarMatcher per live constrained request; used on the engine thread only."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._matchers: dict[str, object] = {}

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._matchers

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def add(self, req_id: str, compiled) -> None:
        import xgrammar as xgr

        self._matchers[req_id] = xgr.GrammarMatcher(compiled)

    def remove(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)

    def bitmasks(self, req_ids: Iterable[str], spec_tokens: dict[str, list[int]] | None = None) -> dict[str, bytes]:
        """For each constrained request among `req_ids`: its next-token bitmask as little-endian int32
        words (`bitmask_words(vocab_size)` of them), the plain bytes a SchedulerOutput can carry. A request
        verifying k drafts (`spec_tokens`, speculative decoding) gets k + 1 masks back to back: the mask at each
        verified position, the matcher advanced through the drafts before it and rolled back after (a draft the
        grammar refuses is rejected by its own position's mask; the masks after it allow everything)."""
        out = {}
        words = bitmask_words(self.vocab_size)
        for rid in req_ids:
            m = self._matchers.get(rid)
            if m is None:
                continue
            drafts = spec_tokens.get(rid, ()) if spec_tokens else ()
            mask = np.full((1 + len(drafts), words), -1, dtype=np.int32)
            accepted = 0
            for j in range(len(drafts) + 1):
                if m.is_terminated():
                    break
                m.fill_next_token_bitmask(mask, j)
                if j == len(drafts) or not m.accept_token(drafts[j]):
                    break
                accepted += 1
            if accepted:
                m.rollback(accepted)
            out[rid] = mask.tobytes()
        return out

    def accept(self, req_id: str, token_ids: Iterable[int]) -> bool:
        """Advance the request's matcher; False when the grammar refuses a token (then it is dropped)."""
        m = self._matchers.get(req_id)
        if m is None:
            return True
        for t in token_ids:
            if m.is_terminated():
                return True  # tokens after the stop token (none expected) are not the grammar's business
            if not m.accept_token(t):
                logger.warning("request %s: grammar refused token %d; unconstrained from here", req_id, t)
                self.remove(req_id)
                return False
        return True
