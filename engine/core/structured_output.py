"""Structured output on xgrammar: grammars compiled off the engine thread, one matcher per request.

Where the work happens, and why:
- Compiling (`GrammarCompilerPool.compile`) runs on this module's thread pool. `process_inputs` calls
  it, and that runs on the caller's thread (a server handler's `asyncio.to_thread`, or `LLM`'s caller),
  never on the engine loop: a request whose grammar is compiling waits there, before it reaches the
  scheduler, while the loop steps everything else. Equal specs share one compile (and xgrammar's cache).
  A spec that does not compile is a ValueError naming its field, as any other bad input.
- The token bitmask is computed on the engine thread (`StructuredOutputManager.bitmasks`), per request
  scheduled this step, from the request's `GrammarMatcher`, and travels to each rank in its own
  `SchedulerOutput.grammar_bitmask` (as vLLM v1 does): the engine is the one place that sees every
  sampled token in order, and under expert parallelism each rank only needs its own rows. The worker's
  sampler turns it into a mask on the logits before sampling (engine/rank/sampler.py).
- The matcher advances by the tokens the scheduler accepted (`accept`). A preempted request keeps its
  output tokens (recompute), so its matcher stays right; a finished or aborted one is dropped.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import numpy as np

from .json_schema_grammar import schema_ebnf
from ..contract.safe_text import shown
from ..contract.structured_output_params import PREFIX, StructuredOutputParams, choice_ebnf

logger = logging.getLogger(__name__)


CACHE_LIMIT_BYTES = 256 << 20  # xgrammar's compiled-grammar cache
MAX_SHARED_COMPILES = 256


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit t of word t // 32: token t allowed)."""
    return -(-vocab_size // 32)


class GrammarCompilerPool:
    """Compiles specs on a small thread pool; the xgrammar tokenizer info is built once, lazily."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], max_workers: int = 2):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()  # the shared-compile table
        # Building the tokenizer info reads the whole vocabulary (seconds for 150k tokens): its own lock, so
        # submit() is never held up behind it.
        self._compiler_lock = threading.Lock()
        self._compiler = None
        self._futures: dict[tuple[str, str], Future] = {}

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                # moelink's Tokenizer wraps a `tokenizers` object; xgrammar reads the vocabulary kind
                # (byte-level BPE for the built-in tokenizer) from a transformers fast tokenizer over it.
                hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer._tok)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                # Bounded: every distinct schema a client sends is cached, so an unbounded cache is a memory leak.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def _compile(self, params: StructuredOutputParams):
        compiler = self._get_compiler()
        kind, spec = params.key
        # JSON goes through engine/core/json_schema_grammar.py, which corrects what xgrammar's converter gets wrong
        # (invalid JSON in some strings, unbounded numbers) and prints compact JSON (no free whitespace between
        # tokens: a weak model otherwise may emit whitespace until max_tokens, vLLM's --disable-any-whitespace).
        if kind == "json":
            return compiler.compile_grammar(schema_ebnf(json.loads(spec)))
        if kind == "json_object":
            return compiler.compile_grammar(schema_ebnf({"type": "object"}))
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "grammar":
            return compiler.compile_grammar(spec)
        return compiler.compile_grammar(choice_ebnf(params.choice))

    def submit(self, params: StructuredOutputParams) -> Future:
        key = params.key
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                if len(self._futures) >= MAX_SHARED_COMPILES:
                    # Only in-flight compiles need sharing (xgrammar caches the results): forget finished ones.
                    self._futures = {k: f for k, f in self._futures.items() if not f.done()}
                fut = self._futures[key] = self._pool.submit(self._compile, params)
        return fut

    def compile(self, params: StructuredOutputParams):
        """The compiled grammar; waits on the pool (call it off the engine loop). Raises ValueError
        naming the field when the spec does not compile."""
        fut = self.submit(params)
        try:
            return fut.result()
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            with self._lock:
                if self._futures.get(params.key) is fut:
                    del self._futures[params.key]  # a bad spec is not cached
            kind = params.kind
            raise ValueError(f"{PREFIX}{kind}={shown(getattr(params, kind))} is invalid: {_reason(e)}.") from None

    def shutdown(self) -> None:
        # Waits for a running compile (milliseconds for sane specs), then frees the compiler here rather than
        # at interpreter exit, where destroying xgrammar's native thread pool can abort the process.
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._compiler_lock:
            self._compiler = None
        with self._lock:
            self._futures.clear()


def _reason(exc: Exception) -> str:
    """xgrammar's message without its "[time] /path/file.cc:line: " prefix or final period."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return re.sub(r"^(\[[^\]]*\]\s*)?\S+\.cc:\d+:\s*", "", lines[0]).rstrip(".")


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
