"""Requests in flight on this server: admission (queue limits, draining), ids for Abort, load counters.

Everything here runs on the server's event loop, so there are no locks. A
request counts as *queued* from admission until its first output: that is
what a queue limit must bound (a running request already holds its blocks),
and counting it here, not from the engine's scheduler, sees a burst of
requests at once instead of a step later.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional


class Overloaded(Exception):
    """The queue is full: answer RESOURCE_EXHAUSTED. `reason`: which limit (vLLM's admission_rejections label:
    "max_num_queued_reqs" or "max_num_queued_tokens")."""

    def __init__(self, message: str, reason: str = "max_num_queued_reqs"):
        super().__init__(message)
        self.reason = reason


class Draining(Exception):
    """The server is shutting down or the engine is dead: answer UNAVAILABLE."""


class DuplicateRequest(Exception):
    """The request id is already running (in the caller's scope): answer ALREADY_EXISTS."""


# A request's key: (scope, the id its client gave). The gRPC services use the scope "" (one namespace: their Abort
# RPC ends any id, as vLLM's does); HTTP /generate uses its client's (gateway/generate_route.py), so two clients may
# use the same `rid` without either learning that the other's runs, and /abort_request ends the caller's own.
RequestKey = tuple[str, str]


@dataclass
class Entry:
    request_id: str
    engine_ids: list[str]
    queued_tokens: int
    queued: bool = True
    sequences: int = 1  # n: what --max-queued-requests counts
    aborted: bool = False  # an Abort asked for it (samples not yet in the engine are aborted on arrival)
    admitted_at: float = field(default_factory=time.monotonic)
    scope: str = ""  # whose namespace its id is in (RequestKey)

    @property
    def key(self) -> RequestKey:
        return (self.scope, self.request_id)


class RequestRegistry:
    def __init__(self, max_queued_requests: Optional[int] = None, max_queued_tokens: Optional[int] = None):
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.active: dict[RequestKey, Entry] = {}
        self.queued_requests = 0
        self.queued_sequences = 0  # requests x their n: what --max-queued-requests bounds
        self.queued_tokens = 0
        self.draining = False
        self.unavailable_reason: Optional[str] = None  # set when the engine died
        self.requests_total = 0
        self.rejected_total = 0
        self.generated_tokens_total = 0
        self.last_receive_time = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._token_buckets: deque[list] = deque()  # [second, tokens], last ~10 s

    # -- admission ------------------------------------------------------------
    def admit(self, request_id: str, engine_ids: list[str], queued_tokens: int, scope: str = "") -> Entry:
        """Admit a request whose id is `request_id` in `scope` (RequestKey); raises Draining, DuplicateRequest (an
        id of the same scope still running) or Overloaded."""
        self.last_receive_time = time.time()
        if self.draining:
            raise Draining("the server is shutting down and takes no new requests; retry on another replica.")
        if self.unavailable_reason is not None:
            raise Draining(self.unavailable_reason)
        if (scope, request_id) in self.active:
            raise DuplicateRequest(f"request_id={request_id!r} is already running: give each request its own id.")
        # Sequences, not requests: n=64 is 64 sequences for the scheduler and the KV cache, so counting it as
        # one let `--max-queued-requests 4` hold 240 waiting sequences. An empty queue admits one request of
        # any n (as below for tokens), or an n over the limit would be refused forever.
        sequences = len(engine_ids)
        if (self.max_queued_requests is not None and self.queued_sequences > 0
                and self.queued_sequences + sequences > self.max_queued_requests):
            self.rejected_total += 1
            raise Overloaded(
                f"server overloaded: {self.queued_sequences} sequences (requests x n) are already queued and this "
                f"request adds {sequences}, over the limit (--max-queued-requests, which counts sequences) of "
                f"{self.max_queued_requests}; retry later.")
        # An empty queue admits one request of any size: RESOURCE_EXHAUSTED means "retry later", and a
        # prompt longer than the limit would otherwise be refused forever on an idle server.
        if (self.max_queued_tokens is not None and self.queued_requests > 0
                and self.queued_tokens + queued_tokens > self.max_queued_tokens):
            self.rejected_total += 1
            raise Overloaded(
                f"server overloaded: {self.queued_tokens} prompt tokens are queued and this request adds "
                f"{queued_tokens}, over the limit (--max-queued-tokens) of {self.max_queued_tokens}; retry later.",
                "max_num_queued_tokens")
        entry = Entry(request_id, list(engine_ids), queued_tokens, sequences=sequences, scope=scope)
        self.active[entry.key] = entry
        self.queued_requests += 1
        self.queued_sequences += sequences
        self.queued_tokens += queued_tokens
        self.requests_total += 1
        self._idle.clear()
        return entry

    def mark_started(self, entry: Entry) -> None:
        if entry.queued:
            entry.queued = False
            self.queued_requests -= 1
            self.queued_sequences -= entry.sequences
            self.queued_tokens -= entry.queued_tokens

    def release(self, entry: Entry) -> None:
        self.mark_started(entry)
        if self.active.get(entry.key) is entry:
            del self.active[entry.key]
        if not self.active:
            self._idle.set()

    def running(self, request_id: str, scope: str = "") -> bool:
        """Whether the request `request_id` of `scope` is in flight."""
        return (scope, request_id) in self.active

    def engine_ids(self, keys) -> list[str]:
        """The engine requests (samples) of the requests `keys` (RequestKey) still in flight."""
        out = []
        for key in keys:
            entry = self.active.get(key)
            if entry is not None:
                out.extend(entry.engine_ids)
        return out

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in flight (within `timeout` seconds)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return not self.active

    # -- load -----------------------------------------------------------------
    def record_tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.generated_tokens_total += n
        sec = int(time.monotonic())
        if self._token_buckets and self._token_buckets[-1][0] == sec:
            self._token_buckets[-1][1] += n
        else:
            self._token_buckets.append([sec, n])
            while self._token_buckets and self._token_buckets[0][0] < sec - 10:
                self._token_buckets.popleft()

    def generation_throughput(self, window_s: int = 10) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = int(time.monotonic())
        return sum(n for s, n in self._token_buckets if s > now - window_s) / window_s
