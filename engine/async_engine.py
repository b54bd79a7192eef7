"""AsyncEngine: an LLMEngine stepped by a background thread, driven from asyncio.

    engine = AsyncEngine.from_engine_args(EngineArgs(model=path))
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        ...
    await engine.abort("req-1")

The engine thread owns the LLMEngine: callers only enqueue commands (`AddCommand`,
`AbortCommand`), so the scheduler is never touched from two threads. A front end reads what
it needs through this class (`info`, `process_inputs`, `stats`, `expert_load`), never the
LLMEngine. Outputs go to a per-request asyncio.Queue on the caller's loop. When the consumer
stops iterating (break, cancellation, client disconnect) the request is aborted and its KV
blocks freed within one step.

Step watchdog: a step that runs longer than the step timeout (`--step-timeout`; the first
step, which compiles kernels, gets at least FIRST_STEP_TIMEOUT_S) kills the engine: health
goes NOT_SERVING and every stream ends with EngineDeadError naming the reason. A multi-rank
executor enforces the same bound itself (and stops its ranks); this one also covers a single
rank, whose hung step nothing else can see. `end_streams` ends streams at once, from the
caller's side, when the engine thread cannot (a drain whose grace ran out during a hung step).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from moelink.scheduler.engine_output import SchedulerStats

from .engine_args import EngineArgs
from .engine_info import EngineInfo
from .llm_engine import LLMEngine, ProcessedRequest, PromptType
from .moe_metrics import ExpertLoadReport
from .outputs import CompletionOutput, OutputKind, RequestOutput
from .safe_text import shown
from .sampling_params import SamplingParams
from .timeouts import FIRST_STEP_TIMEOUT_S

logger = logging.getLogger(__name__)

# The executor's own step watchdog fires first when it has one (its error names the rank): this one
# waits that much longer (at most half the budget).
_WATCHDOG_MARGIN_S = 5.0
_WATCHDOG_POLL_S = 0.25


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight request ends with this error."""


class MetricsSink(Protocol):
    """Where the engine thread reports outputs (moelink.engine.metrics.EngineMetrics)."""

    def attach(self, engine: LLMEngine) -> None:
        """Called once, by the AsyncEngine that takes this sink: the engine whose counters it reads."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Outputs the engine just produced (steps and aborts alike), on the engine thread."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list
    output_kind: OutputKind
    # Set by the engine thread once this stream's request is in the engine. A caller may
    # reuse an id the moment its previous stream ended, while that request's abort is
    # still queued: until then, outputs under the id are the old request's, not ours.
    live: bool = False
    last: RequestOutput | None = None  # the last output handed to the consumer

    def put(self, item) -> bool:
        """False if the consumer's event loop is closed (nobody will ever read)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            return False
        return True


@dataclass(frozen=True)
class AddCommand:
    """Put a validated request into the engine; its outputs go to `stream`."""

    processed: ProcessedRequest
    output_kind: OutputKind
    stream: _Stream


@dataclass(frozen=True)
class AbortCommand:
    """End a request (finish_reason "abort") and free its KV blocks."""

    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: MetricsSink | None = None):
        """`metrics`: a sink for every output the engine produces (None: no metrics)."""
        self.engine = engine
        self._info = engine.info()
        self._metrics = metrics
        if metrics is not None:
            metrics.attach(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._dead_error: BaseException | None = None
        self._step_started: float | None = None  # monotonic time the running step began
        self._steps_done = 0
        self._thread = threading.Thread(target=self._run, name="moelink-engine", daemon=True)
        self._thread.start()
        # Set by shutdown: the watchdog wakes at once and ends, and shutdown joins it. A watchdog left sleeping
        # would hold the last reference to this engine until interpreter exit and free its tensors there, on a
        # daemon thread (torch aborts: "terminate called without an active exception").
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_steps, name="moelink-step-watchdog", daemon=True)
        self._watchdog.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, metrics: MetricsSink | None = None) -> "AsyncEngine":
        return cls(LLMEngine.from_engine_args(args), metrics)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def info(self) -> EngineInfo:
        """Model, limits, KV block shape, ranks, EOS ids and device: fixed once the engine has started."""
        return self._info

    @property
    def metrics(self) -> MetricsSink | None:
        return self._metrics

    @property
    def dead_error(self) -> BaseException | None:
        """Why the engine cannot run requests any more (None while it can). A lost rank counts at
        once, before the engine thread has noticed."""
        return self._dead_error or getattr(self.engine.executor, "dead_error", None)

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died, a rank was lost (even between steps) or a step hung."""
        return self.dead_error is None and self._thread.is_alive()

    # -- public API -------------------------------------------------------------
    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                       output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request. Raises ValueError for bad input before anything is queued."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        if params is not None and params.structured_outputs is not None:
            # Its grammar compiles on the engine's grammar pool; wait for it off this event loop.
            processed = await asyncio.to_thread(self.process_inputs, request_id, prompt, params)
        else:
            processed = self.process_inputs(request_id, prompt, params)
        gen = self.generate_processed(processed, output_kind)
        async with contextlib.aclosing(gen):  # closing this closes (and so aborts) the request at once
            async for out in gen:
                yield out

    async def generate_processed(self, processed: ProcessedRequest,
                                 output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """`generate` for a request `process_inputs` already validated (the server validates once per
        request, whatever its number of samples)."""
        request_id = processed.request_id
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), processed.prompt_token_ids, output_kind)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id={shown(request_id)} is already in use by a running request.")
            self._streams[request_id] = stream
            if self.dead_error is not None:
                self._streams.pop(request_id, None)
                raise EngineDeadError(f"engine is not running: {self.dead_error}")
            # Under the lock: the engine thread's last command drain (shutdown)
            # then either sees this add or this call sees dead_error.
            self._send(AddCommand(processed, output_kind, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._send(AbortCommand(request_id))

    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                       field: str | None = None) -> ProcessedRequest:
        """Tokenize and validate a request (`LLMEngine.process_inputs`); raises ValueError naming the bad
        field. Thread-safe: it only reads, so a server may call it from a worker thread."""
        return self.engine.process_inputs(request_id, prompt, params, field)

    async def abort(self, request_id: str) -> None:
        """End a request with finish_reason 'abort'; its stream gets a final output."""
        self._send(AbortCommand(request_id))

    def end_streams(self, request_ids, reason: str = "abort") -> int:
        """End these requests' streams now with a final output (finish_reason `reason`), without
        waiting for the engine thread, which may be inside a step that does not end (a hung rank).
        Thread-safe. The engine still aborts the requests, and frees their KV blocks, as soon as it
        can (or when it dies or shuts down). Returns how many streams were ended."""
        ended = 0
        for rid in request_ids:
            with self._lock:
                stream = self._streams.pop(rid, None)  # later outputs under this id are dropped
            if stream is None:
                continue
            stream.put(_final_output(rid, stream, reason))
            self._send(AbortCommand(rid))
            ended += 1
        return ended

    def stats(self) -> SchedulerStats:
        """All ranks together. Read from any thread: a snapshot of plain counters."""
        return self.engine.stats()

    def rank_stats(self) -> list[SchedulerStats]:
        """One entry per rank."""
        return self.engine.rank_stats()

    def expert_load(self) -> ExpertLoadReport:
        """Expert load and all-to-all volume since start."""
        return self.engine.expert_load()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
        # Also with the loop still inside a step (a hung rank): stopping the ranks is what ends that step.
        self.engine.shutdown()
        self._thread.join(timeout)
        self._closed.set()
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout)

    # -- engine thread ----------------------------------------------------------
    def _send(self, cmd: AddCommand | AbortCommand) -> None:
        self._commands.put(cmd)
        self._wakeup.set()

    def _observe(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        if self._metrics is not None:
            self._metrics.on_outputs(outputs)
        return outputs

    def _abort(self, request_ids, reason: str = "abort") -> list[RequestOutput]:
        return self._observe(self.engine.abort_requests(request_ids, reason))

    def _deliver(self, outputs) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None or not stream.live:
                continue
            stream.last = out
            if not stream.put(out):
                # Its consumer's loop closed without closing the generator: free
                # the request here rather than let one client kill the engine thread.
                with self._lock:
                    self._streams.pop(out.request_id, None)
                if not out.finished:
                    self._send(AbortCommand(out.request_id))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, AddCommand):
                try:
                    self.engine.add_processed(cmd.processed, cmd.output_kind)
                except Exception as exc:  # e.g. a duplicate id: fail this request only
                    cmd.stream.put(exc)
                    continue
                with self._lock:
                    # Only the stream that sent this add, and only if still listening.
                    cmd.stream.live = self._streams.get(cmd.processed.request_id) is cmd.stream
            else:
                self._deliver(self._abort([cmd.request_id]))

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if self.engine.has_requests():
                    self._step_started = time.monotonic()
                    outputs = self._observe(self.engine.step())
                    self._step_started = None
                    self._steps_done += 1
                    if self._dead_error is not None:  # the watchdog gave up on this step while it ran
                        raise self._dead_error
                    self._deliver(outputs)
                else:
                    self.engine.check_health()  # a rank lost while idle kills the engine now, not at the next request
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
            # Shutdown: refuse new requests (generate checks dead_error under the
            # lock), then whatever is still running ends with reason "abort".
            with self._lock:
                self._dead_error = EngineDeadError("engine is shut down")
            self._apply_commands()
            self._deliver(self._abort(list(self.engine.output_processor.states)))
        except BaseException as exc:  # the engine is dead: fail everyone, hang no one
            self._step_started = None
            if self._dead_error is None:
                if self._stopping:  # shutdown stopped the ranks under a step that had not ended
                    logger.warning("engine loop stopped inside a step at shutdown: %s", exc)
                else:
                    logger.exception("engine loop failed")
            self._die(exc)
            try:
                self._abort(list(self.engine.output_processor.states), reason="error")
            except Exception:
                logger.exception("could not free requests after the engine failed")

    def _die(self, exc: BaseException) -> None:
        """Record the first fatal error and fail every stream with it (from any thread)."""
        with self._lock:
            if self._dead_error is None:
                self._dead_error = exc
            exc = self._dead_error
            streams = list(self._streams.values())
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop failed: {exc}")
        for stream in streams:
            stream.put(err)

    def _step_budget(self) -> float:
        timeout = self.engine.config.parallel.step_timeout_s
        return max(timeout, FIRST_STEP_TIMEOUT_S) if self._steps_done == 0 else timeout

    def _watch_steps(self) -> None:
        """The step watchdog: a step running past its budget kills the engine (health, streams)."""
        while self._thread.is_alive() and self._dead_error is None:
            if self._closed.wait(_WATCHDOG_POLL_S):
                return
            started = self._step_started
            budget = self._step_budget()
            if started is None or time.monotonic() - started <= budget + min(_WATCHDOG_MARGIN_S, budget / 2):
                continue
            err = EngineDeadError(f"the engine is hung: a step has run for more than {budget:g} s (--step-timeout)")
            logger.error("%s; failing every request", err)
            self._die(err)
            return


def _final_output(request_id: str, stream: _Stream, reason: str) -> RequestOutput:
    """A last output for a stream ended from outside the engine: nothing new, finish_reason `reason`."""
    last = stream.last
    cumulative = stream.output_kind is not OutputKind.DELTA and last is not None
    prev = last.outputs[0] if cumulative else None
    comp = CompletionOutput(index=0, text=prev.text if prev else "", token_ids=list(prev.token_ids) if prev else [],
                            cumulative_logprob=prev.cumulative_logprob if prev else None,
                            logprobs=prev.logprobs if prev else None, finish_reason=reason)
    return RequestOutput(request_id, last.prompt if last else None, stream.prompt_token_ids, [comp], finished=True,
                         num_cached_tokens=last.num_cached_tokens if last else 0)
