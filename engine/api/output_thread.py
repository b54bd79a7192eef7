"""AsyncEngine's output thread: each step's output work (detokenization, stop strings, logprobs, RequestOutputs),
the metrics sink and stream delivery run here, beside the engine thread's step loop, never between two device
steps (vLLM's front-end process does the same for its engine core).

The engine thread hands its work over through one FIFO (`OutputQueue`) in the order it happened: a request's
addition before any of its tokens, each step's core outputs, an abort's finish after the tokens before it. So
this thread alone owns the LLMEngine's OutputProcessor once the AsyncEngine has started, and no output arrives
for a request it does not know yet. A stop string found here ends the stream at once and is reported back
(`on_stop`): the engine thread finishes the request in its scheduler at its next command drain, and the tokens
it produced for it meanwhile find no state here and are dropped.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union

from moelink.scheduler.engine_output import EngineCoreOutput

from ..core.input_processing import ProcessedRequest
from ..core.output_processor import OutputProcessor
from ..core.outputs import CompletionOutput, OutputKind, RequestOutput

logger = logging.getLogger(__name__)

# Step batches the engine thread may queue ahead of the output thread (besides the one it is processing). Past
# that, a consumer slower than the device (a blocked metrics sink, a huge batch to detokenize) makes the engine
# thread wait before its next step instead of queueing outputs, their memory and their latency without bound.
# Small, because each queued step is one more step between a token's sampling and its delivery, and one more
# token computed for a request past its stop string; 4 absorbs a slow output pass now and then.
MAX_QUEUED_STEPS = 4


@dataclass
class Stream:
    """One consumer's outputs on its event loop (AsyncEngine.generate): the engine's side of the stream."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list
    output_kind: OutputKind
    # Cleared by the caller's side when its consumer stops reading (done, walked away, ended by end_streams):
    # what is still produced for its request is dropped.
    listening: bool = True
    last: RequestOutput | None = None  # the last output handed to the consumer
    # Back-pressure (issue 95: streams nobody read kept generating, +84 MB a minute, others' latency up): once
    # `backlog_limit` outputs wait in `queue` (0: no limit), `on_backlog(True)` stops the request being scheduled
    # (Scheduler.backlogged: it keeps its KV and slot); the consumer's side calls `on_backlog(False)` when it has
    # taken the queue down to half (AsyncEngine.generate_processed). Both on the consumer's loop.
    backlog_limit: int = 0
    on_backlog: Callable[[bool], None] | None = None
    backlogged: bool = False

    def note_put(self, out: RequestOutput) -> None:
        """After an output went into `queue` (the consumer's loop): stop the request past `backlog_limit`."""
        if (self.backlog_limit and not self.backlogged and not out.finished
                and self.queue.qsize() >= self.backlog_limit and self.on_backlog is not None):
            self.backlogged = True
            self.on_backlog(True)

    def note_taken(self) -> None:
        """After the consumer took an item (its loop): resume the request once the queue is down to half."""
        if self.backlogged and self.queue.qsize() <= self.backlog_limit // 2:
            self.backlogged = False
            if self.on_backlog is not None:
                self.on_backlog(False)

    def put(self, item) -> bool:
        """False if the consumer's event loop is closed (nobody will ever read)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            return False
        return True

    def final_output(self, request_id: str, reason: str) -> RequestOutput:
        """A last output for a stream ended from outside the engine: nothing new, finish_reason `reason`."""
        last = self.last
        cumulative = self.output_kind is not OutputKind.DELTA and last is not None
        prev = last.outputs[0] if cumulative else None
        comp = CompletionOutput(index=0, text=prev.text if prev else "", token_ids=list(prev.token_ids) if prev else [],
                                cumulative_logprob=prev.cumulative_logprob if prev else None,
                                logprobs=prev.logprobs if prev else None, finish_reason=reason)
        return RequestOutput(request_id, last.prompt if last else None, self.prompt_token_ids, [comp], finished=True,
                             num_cached_tokens=last.num_cached_tokens if last else 0)


@dataclass(frozen=True)
class AddOutputs:
    """A request to add, one record all the way: the AsyncEngine's command (`AddCommand`), which the engine
    thread passes on as is once the core holds the request: its output state, its outputs going to `stream`."""

    processed: ProcessedRequest
    output_kind: OutputKind
    stream: Stream


@dataclass(frozen=True)
class StepOutputs:
    """One step's core outputs (new tokens, finishes), in the engine's order."""

    core_outputs: list[EngineCoreOutput]


@dataclass(frozen=True)
class FinishOutputs:
    """Requests the engine thread ended (abort, shutdown, engine error): their final outputs, delivered unless
    their streams already got the engine's error (`deliver` False: the metrics sink still sees them)."""

    request_ids: list[str]
    reason: str
    deliver: bool = True


OutputItem = Union[AddOutputs, StepOutputs, FinishOutputs]


class OutputQueue:
    """The FIFO from the engine thread (its only writer) to the output thread (its only reader). Step batches
    are bounded (`wait_for_room`); additions and finishes never wait, so no command waits on the consumer."""

    def __init__(self, max_steps: int = MAX_QUEUED_STEPS):
        self.max_steps = max_steps
        self._items: deque[OutputItem] = deque()
        self._steps = 0  # StepOutputs queued
        self._closed = False
        self._cond = threading.Condition()

    @property
    def queued_steps(self) -> int:
        return self._steps

    def put(self, item: OutputItem) -> None:
        """Queue an item; never waits (the engine thread waits for room before the step, outside it)."""
        with self._cond:
            self._items.append(item)
            if isinstance(item, StepOutputs):
                self._steps += 1
            self._cond.notify_all()

    def wait_for_room(self, interrupted: Callable[[], bool]) -> None:
        """Wait while `max_steps` step batches are queued, or until `interrupted()` (checked whenever the reader
        takes a batch or `wake` is called: whoever makes it true calls `wake`)."""
        with self._cond:
            self._cond.wait_for(lambda: self._steps < self.max_steps or interrupted())

    def wake(self) -> None:
        """Have `wait_for_room` recheck its `interrupted` (shutdown, a dead engine)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Nothing more comes: the reader ends once it has taken what is queued. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self) -> OutputItem | None:
        """The oldest item, waiting for one; None once closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, StepOutputs):
                self._steps -= 1
                self._cond.notify_all()
            return item


class OutputThread:
    """The output side of one AsyncEngine, on thread "moelink-output": owns `processor`, calls `on_outputs` (the
    metrics sink) with every output it makes and hands each output to its stream.

    Tells its AsyncEngine, from this thread: `on_stop(request_id, stream)`, a stop string ended the request
    (before its final output is delivered, so that the add of a caller who then reuses the id is queued behind
    it); `on_lost(request_id, stream, finished)`, the consumer's event loop is closed; `on_error(exc)`, this
    thread failed (the engine is dead: it then holds no request state)."""

    def __init__(self, processor: OutputProcessor, queue: OutputQueue,
                 on_outputs: Callable[[list[RequestOutput]], None] | None,
                 on_stop: Callable[[str, Stream], None], on_lost: Callable[[str, Stream, bool], None],
                 on_error: Callable[[BaseException], None]):
        self._processor = processor
        self._queue = queue
        self._on_outputs = on_outputs
        self._on_stop, self._on_lost, self._on_error = on_stop, on_lost, on_error
        # The stream of each request `processor` holds: outputs under an id go to the stream of the request that
        # made them, never to a newer stream that reuses the id while the old request's abort is still queued.
        self._streams: dict[str, Stream] = {}
        self._thread = threading.Thread(target=self._run, name="moelink-output", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                self._handle(item)
        except BaseException as exc:
            logger.exception("output thread failed")
            # Every stream gets the engine's error (on_error) and the engine thread ends every request: no
            # state here outlives them.
            self._processor.states.clear()
            self._streams.clear()
            self._on_error(exc)

    def _handle(self, item: OutputItem) -> None:
        if isinstance(item, StepOutputs):
            outputs, stopped = self._processor.process(item.core_outputs)
            for rid in stopped:
                self._on_stop(rid, self._streams[rid])
            self._deliver(outputs)
        elif isinstance(item, AddOutputs):
            p = item.processed
            self._processor.add_request(p.request_id, p.prompt, p.prompt_token_ids, p.params, item.output_kind)
            self._streams[p.request_id] = item.stream
        else:
            finish = self._processor.finish
            outputs = [o for o in (finish(rid, item.reason) for rid in item.request_ids) if o is not None]
            self._deliver(outputs, send=item.deliver)

    def _deliver(self, outputs: list[RequestOutput], send: bool = True) -> None:
        if not outputs:
            return
        if self._on_outputs is not None:
            self._on_outputs(outputs)
        # One wake-up of each consumer loop for the whole batch (a server's streams share one loop): each
        # call_soon_threadsafe writes the loop's self-pipe, a syscall and a GIL hand-off per token otherwise.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.pop(out.request_id) if out.finished else self._streams[out.request_id]
            if not send or not stream.listening:
                continue
            stream.last = out
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_each, items)
            except RuntimeError:  # the consumers' loop is closed: nobody will ever read
                for stream, out in items:
                    self._on_lost(out.request_id, stream, out.finished)


def _put_each(items: list[tuple[Stream, RequestOutput]]) -> None:
    """On the consumers' loop: each output into its stream's queue, in the engine's order."""
    for stream, out in items:
        stream.queue.put_nowait(out)
        if stream.backlog_limit:
            stream.note_put(out)
