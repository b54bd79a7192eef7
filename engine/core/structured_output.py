"""Structured output on xgrammar: grammars compiled off the engine thread, one matcher per request.

Where the work happens, and why:
- Compiling (`GrammarCompilerPool`, engine/core/grammar_compile.py) runs in child processes with their own
  bounded queue, a size and a time limit, and cancellation when every client of a compile has left. A
  request whose grammar is compiling waits before it reaches the scheduler (`LLM`'s caller in
  `process_inputs`; a server handler awaits it on its event loop), while the loop steps everything else.
  Equal specs share one compile. A spec that does not compile is a ValueError naming its field, as any
  other bad input.
- The token bitmask of a request's next position is filled on the manager's own thread as soon as its matcher
  has advanced (`StructuredOutputManager`), and the engine holds the request back from scheduling until it is
  ready (`Scheduler.held`): a slow mask (a 400-way regex) delays its own request, not every stream's step.
  `bitmasks` hands the ready masks of the requests scheduled this step (with speculative drafts, the masks
  at each draft position are filled there, on the engine thread). Each rank's masks travel in its own
  `SchedulerOutput.grammar_bitmask` (as vLLM v1 does): the engine is the one place that sees every
  sampled token in order, and under expert parallelism each rank only needs its own rows. The worker's
  sampler turns it into a mask on the logits before sampling (engine/rank/sampler.py).
- The matcher advances by the tokens the scheduler accepted (`accept`). A preempted request keeps its
  output tokens (recompute), so its matcher stays right; a finished or aborted one is dropped.
"""
from __future__ import annotations

import logging
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .grammar_compile import GrammarCompilerPool, GrammarQueueFull  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import xgrammar as xgr  # imported where used: seconds, the first time

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit t of word t // 32: token t allowed)."""
    return -(-vocab_size // 32)


class StructuredOutputManager:
    """One xgrammar GrammarMatcher per live constrained request, and its next mask, filled off the engine thread.

    The engine thread owns the matchers except while a fill runs: the mask of a request's current state is filled
    on this manager's thread ("grammar-mask"; xgrammar releases the GIL while it fills), started when the request
    is added and each time its matcher advances (`accept`). The engine holds the request back from scheduling
    until its mask is ready (`poll`), so a slow mask delays that request alone, never the step of the others; and
    a held request is never scheduled, so its matcher is never used by two threads at once."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._matchers: dict[str, xgr.GrammarMatcher] = {}
        self._masks: dict[str, np.ndarray] = {}  # the mask of each matcher's current state, once filled
        self._filling: dict[str, Future] = {}
        self._finished: queue.SimpleQueue = queue.SimpleQueue()  # ids whose fill ended (the fill thread puts them)
        self._pool: ThreadPoolExecutor | None = None

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._matchers

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def add(self, req_id: str, compiled) -> None:
        import xgrammar as xgr

        self._matchers[req_id] = xgr.GrammarMatcher(compiled)
        self._refill(req_id)

    def remove(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)
        self._masks.pop(req_id, None)
        self._filling.pop(req_id, None)  # a fill still running finishes into nothing

    def ready(self, req_id: str) -> bool:
        """The request's next mask is filled (it may be scheduled)."""
        return req_id not in self._filling

    def poll(self, timeout: float | None = None) -> list[str]:
        """Ids whose mask became ready since the last call (waits up to `timeout` for one when none has)."""
        out = []
        while True:
            try:
                rid = self._finished.get(block=timeout is not None and not out, timeout=timeout)
            except queue.Empty:
                return out
            fut = self._filling.get(rid)
            if fut is not None and fut.done():
                del self._filling[rid]
                self._take(rid, fut)
                out.append(rid)

    def filling(self) -> bool:
        return bool(self._filling)

    def _refill(self, req_id: str) -> None:
        m = self._matchers[req_id]
        self._masks.pop(req_id, None)
        if m.is_terminated():
            return  # nothing more to sample under the grammar (its stop token was accepted)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        words = bitmask_words(self.vocab_size)

        def fill():
            mask = np.full((1, words), -1, dtype=np.int32)
            m.fill_next_token_bitmask(mask, 0)
            return mask

        fut = self._filling[req_id] = self._pool.submit(fill)
        fut.add_done_callback(lambda _f: self._finished.put(req_id))

    def _take(self, req_id: str, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:
            logger.warning("request %s: grammar mask failed (%s); unconstrained from here", req_id, exc)
            self.remove(req_id)
        elif req_id in self._matchers:
            self._masks[req_id] = fut.result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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
            fut = self._filling.pop(rid, None)
            if fut is not None:  # scheduled before its fill ended (only if the engine did not hold it): wait for it
                self._take(rid, fut)
            if not drafts and rid in self._masks:
                out[rid] = self._masks[rid].tobytes()
                continue
            if rid not in self._matchers:
                continue
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
        fut = self._filling.pop(req_id, None)
        if fut is not None:  # not expected (a filling request is held back): never two threads on one matcher
            fut.result()
        for t in token_ids:
            if m.is_terminated():
                break  # tokens after the stop token (none expected) are not the grammar's business
            if not m.accept_token(t):
                logger.warning("request %s: grammar refused token %d; unconstrained from here", req_id, t)
                self.remove(req_id)
                return False
        self._refill(req_id)
        return True
