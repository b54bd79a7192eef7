"""AsyncEngine: an LLMEngine stepped by a background thread, driven from asyncio.

    engine = AsyncEngine.from_engine_args(EngineArgs(model=path))
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        ...
    await engine.abort("req-1")

The engine thread owns the LLMEngine's core (scheduler, executor): callers only enqueue
commands (`AddCommand`, `AbortCommand`), so the scheduler is never touched from two threads.
It only applies commands and steps; each step's outputs go through a bounded FIFO to the output
thread ("moelink-output", engine/api/output_thread.py), which detokenizes, checks stop strings,
reports to the metrics sink and delivers, beside the next device step rather than between two.
A front end reads what it needs through this class (`info`, `process_inputs`, `stats`,
`expert_load`), never the LLMEngine. Outputs go to a per-request asyncio.Queue on the caller's
loop. When the consumer stops iterating (break, cancellation, client disconnect) the request is
aborted and its KV blocks freed within one step.

Step watchdog (engine/api/step_watchdog.py): a step that runs longer than the step timeout
(`--step-timeout`) kills the engine: health goes NOT_SERVING and every stream ends with
EngineDeadError naming the reason (as when the output thread fails). `end_streams` ends streams at once, from the
caller's side, when the engine thread cannot (a drain whose grace ran out during a hung step).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from moelink.scheduler.engine_output import EngineCoreOutput, SchedulerStats

from ..config.engine_args import EngineArgs
from ..contract.engine_info import EngineInfo
from ..core.llm_engine import LLMEngine, ProcessedRequest, PromptType
from ..core.moe_metrics import ExpertLoadReport
from ..core.no_tokenizer import NoTokenizer
from .rl_calls import ControlCommand, check_call, drive, run_control, waits
from .output_thread import AddOutputs, FinishOutputs, OutputQueue, OutputThread, StepOutputs, Stream
from ..core.outputs import OutputKind, RequestOutput
from ..contract.safe_text import shown
from ..contract.lora import LoRARequest
from ..contract.sampling_params import SamplingParams
from .step_watchdog import StepWatchdog
from .llm import _with_tokenization
from .vllm_async_compat import VllmAsyncCompat, generate_call

logger = logging.getLogger(__name__)

# As it ends, the engine thread waits this long for the output thread to deliver what is queued (shutdown's
# aborts): a consumer that blocks the output thread must not hold the engine thread forever.
_OUTPUT_DRAIN_TIMEOUT_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight request ends with this error."""


def reason_of(exc: BaseException) -> str:
    """What an error says, never nothing: its message, or its type's name when that is empty (MemoryError() has
    none, and "engine loop failed: " would leave every later refusal without a reason)."""
    return str(exc).strip() or type(exc).__name__


class MetricsSink(Protocol):
    """Where the output thread reports outputs (moelink.engine.core.metrics.EngineMetrics)."""

    def attach(self, engine: LLMEngine) -> None:
        """Called once, by the AsyncEngine that takes this sink: the engine whose counters it reads."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Outputs the engine just produced (steps and aborts alike), on the output thread."""


# Put a validated request into the engine; its outputs go to `stream`. Once the core holds it, the engine thread
# passes the same record on to the output thread, which makes the request's output state from it.
AddCommand = AddOutputs


@dataclass(frozen=True)
class AbortCommand:
    """End a request (finish_reason "abort") and free its KV blocks."""

    request_id: str


@dataclass(frozen=True)
class BacklogCommand:
    """The consumer of `stream` lags behind its outputs (`backlogged`), or caught up: stop or resume scheduling
    the request (Stream.backlog_limit), unless it ended meanwhile."""

    request_id: str
    stream: Stream
    backlogged: bool


@dataclass(frozen=True)
class StopCommand:
    """The output thread found a stop string in the request whose outputs go to `stream` (and made its final
    output): finish it in the scheduler (KV freed), unless it ended otherwise meanwhile."""

    request_id: str
    stream: Stream


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: MetricsSink | None = None):
        """`metrics`: a sink for every output the engine produces (None: no metrics)."""
        self.engine = engine
        self._info = engine.info()
        self._metrics = metrics
        if metrics is not None:
            metrics.attach(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deferred: list[ControlCommand] = []  # control calls waiting for started requests (rl_calls.waits)
        # The control calls' check thread (_control_checks), made at the first call that needs it.
        self._checks: concurrent.futures.ThreadPoolExecutor | None = None
        self._wakeup = threading.Event()
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._dead_error: BaseException | None = None
        # Engine thread only: the stream of each request the core holds. A stop string is reported for a
        # stream: one reported for a request that ended meanwhile (aborted, its id reused) finishes nothing.
        self._in_core: dict[str, Stream] = {}
        self._outputs = OutputQueue()
        # Outputs a stream's consumer may leave untaken before its request stops being scheduled (0: no limit):
        # Stream.backlog_limit, SchedulerConfig.max_undelivered_outputs.
        self.backlog_limit: int = getattr(engine.config.scheduler, "max_undelivered_outputs", 0)
        engine.hand_off_outputs(self._hand_off)
        self._output = OutputThread(engine.output_processor, self._outputs,
                                    metrics.on_outputs if metrics is not None else None,
                                    on_stop=self._stopped, on_lost=self._stream_lost, on_error=self._output_failed)
        self._vllm = VllmAsyncCompat(self)  # vLLM AsyncLLM's RL calls (is_sleeping, collective_rpc, ...)
        self._thread = threading.Thread(target=self._run, name="moelink-engine", daemon=True)
        self._watchdog = StepWatchdog(lambda: engine.config.parallel.step_timeout_s,
                                      lambda: self._thread.is_alive() and self._dead_error is None, self._step_hung)
        self._thread.start()
        self._watchdog.start()  # after the engine thread: it watches while that thread is alive
        if not isinstance(engine.tokenizer, NoTokenizer):
            engine.grammars.prestart()  # serving: the first constrained request finds its compile process up

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
    def takes_control_calls(self) -> bool:
        """Whether the engine was started to take RL control calls (enable_weight_updates): the wire's gate for the
        calls the engine itself does not guard (a cache flush)."""
        return bool(self.engine.config.enable_weight_updates)

    @property
    def dead_error(self) -> BaseException | None:
        """Why the engine cannot run requests any more (None while it can). A lost rank counts at
        once, before the engine thread has noticed."""
        return self._dead_error or self.engine.executor.dead_error

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop or the output thread died, a rank was lost (even between steps) or a
        step hung."""
        return self.dead_error is None and self._thread.is_alive() and self._output.is_alive()

    # -- public API -------------------------------------------------------------
    async def generate(self, *args, **kwargs) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request (with `lora_request`, under that LoRA adapter: docs/lora.md). Raises
        ValueError for bad input before anything is queued. Two call forms (engine/api/vllm_async_compat.py):
        moelink's `generate(request_id, prompt, params=None, output_kind=OutputKind.CUMULATIVE, lora_request=None)`,
        and vLLM AsyncLLM's `generate(prompt, sampling_params, request_id, *, lora_request=None,
        tokenization_kwargs=None)`."""
        call = generate_call(args, kwargs)
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        params = call.params
        if call.tokenization_kwargs:
            params = _with_tokenization([params], call.tokenization_kwargs)[0]
        processed = await self.with_grammar(self.process_inputs(call.request_id, call.prompt, params,
                                                                compile_grammar=False,
                                                                lora_request=call.lora_request))
        output_kind = call.output_kind
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
        stream = Stream(asyncio.get_running_loop(), asyncio.Queue(), processed.prompt_token_ids, output_kind,
                        backlog_limit=self.backlog_limit)
        if self.backlog_limit:
            stream.on_backlog = lambda lagging: self._send(BacklogCommand(request_id, stream, lagging))
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
                if stream.backlogged:
                    stream.note_taken()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._forget(request_id, stream)
            if not finished:
                self._send(AbortCommand(request_id))

    @property
    def multimodal_config(self):
        """The engine's MultimodalConfig (engine/config/multimodal.py): its image limits."""
        return self.engine.config.multimodal

    @property
    def paused(self) -> bool:
        """Whether generation is paused (pause_generation until continue_generation). Read on any thread: one
        attribute the engine thread writes between two steps, so a reader sees the state before or after a call."""
        return self.engine.rl.paused is not None

    @property
    def image_token_id(self) -> int | None:
        """The image placeholder's id when this engine takes images (engine/multimodal/), else None."""
        mm = self.engine.multimodal
        return None if mm is None else mm.image_token_id

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder's id when this engine takes videos (limit_mm_per_prompt video above 0), else None."""
        mm = self.engine.multimodal
        return None if mm is None or not self.multimodal_config.videos else mm.video_token_id

    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                       field: str | None = None, compile_grammar: bool = True,
                       lora_request: LoRARequest | None = None) -> ProcessedRequest:
        """Tokenize and validate a request (`LLMEngine.process_inputs`); raises ValueError naming the bad
        field. Thread-safe: it only reads, so a server may call it from a worker thread. On an event loop pass
        `compile_grammar=False` and then await `with_grammar`: the compile then holds no thread."""
        return self.engine.process_inputs(request_id, prompt, params, field, compile_grammar, lora_request)

    async def with_grammar(self, processed: ProcessedRequest) -> ProcessedRequest:
        """`processed` with its structured-output grammar compiled (engine/core/grammar_compile.py: own processes,
        bounded queue, time limit). Awaited, not run on a thread: a caller cancelled here (its client left)
        releases the compile, which is killed once no caller waits for it. Raises ValueError naming the field,
        or GrammarQueueFull (retry later)."""
        so = processed.params.structured_outputs
        if so is None or processed.grammar is not None:
            return processed
        pool = self.engine.grammars
        processed.grammar = await pool.wait_async(pool.submit(so))
        return processed

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
                stream = self._streams.pop(rid, None)
            if stream is None:
                continue
            stream.listening = False  # later outputs of its request are dropped
            stream.put(stream.final_output(rid, reason))
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
        self._outputs.wake()
        self._thread.join(timeout)
        # Also with the loop still inside a step (a hung rank): stopping the ranks is what ends that step.
        self.engine.shutdown()
        self._thread.join(timeout)
        # The engine thread closes the FIFO as it ends; one still stuck in a step must not keep the output
        # thread waiting for more.
        self._outputs.close()
        self._output.join(timeout)
        self._watchdog.close(timeout)
        if self._checks is not None:  # a check still reading files ends on its own; its caller got EngineDeadError
            self._checks.shutdown(wait=False, cancel_futures=True)

    # -- vLLM AsyncLLM's RL calls (OpenRLHF's rollout actor): engine/api/vllm_async_compat.py ----------------
    async def is_sleeping(self) -> bool:
        return await self._vllm.is_sleeping()

    async def is_paused(self) -> bool:
        return await self._vllm.is_paused()

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        await self._vllm.sleep(level, mode)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._vllm.wake_up(tags)

    async def pause_generation(self, *, mode: str = "abort", wait_for_inflight_requests: bool | None = None,
                               clear_cache: bool = True) -> None:
        await self._vllm.pause_generation(mode=mode, wait_for_inflight_requests=wait_for_inflight_requests,
                                          clear_cache=clear_cache)

    async def resume_generation(self) -> None:
        await self._vllm.resume_generation()

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return await self._vllm.reset_prefix_cache(reset_running_requests, reset_connector)

    async def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list:
        return await self._vllm.collective_rpc(method, timeout, args, kwargs)

    @property
    def output_processor(self):
        """vLLM's AsyncLLM.output_processor as OpenRLHF reads it: its get_num_unfinished_requests() only."""
        return self._vllm

    def num_unfinished_requests(self) -> int:
        """Requests whose stream is still read (added and not finished, aborted or left). Any thread."""
        with self._lock:
            return len(self._streams)

    async def tensor_update(self, named_tensors, weight_version: str | None = None) -> dict:
        """update_weights_from_tensor on the engine thread between two steps ([(checkpoint name, tensor)] of a
        trainer in this process): not one of the control calls a front end makes (engine/api/rl_calls.py)."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        return await self._submit_control("update_weights_from_tensor", (named_tensors, None, weight_version), None,
                                          True)

    # -- engine thread ----------------------------------------------------------
    async def control(self, method: str, *args):
        """An RL control call (engine/api/rl_calls.py: update_weights_from_disk, pause_generation, ...) run on the
        engine thread between two steps, what its arguments make costly off it (rl_calls.drive); its result, or the
        ValueError of its refusal."""
        check_call(method)
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        return await drive(self.engine, method, args, self._submit_control, self._control_checks())

    def _submit_control(self, method: str, args: tuple, call: str | None, ordered: bool) -> asyncio.Future:
        """Queue one ControlCommand for the engine thread (rl_calls.drive's `submit`); the future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.dead_error is not None:
                raise EngineDeadError(f"engine is not running: {self.dead_error}")
            self._send(ControlCommand(method, args, future, call, ordered))
        return asyncio.wrap_future(future)

    def _control_checks(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread control calls check their files on (an update's checkpoint headers): one, so checks queue
        rather than pile up, and never the engine thread (rl_calls.drive)."""
        with self._lock:
            if self._checks is None:
                self._checks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moelink-control-check")
            return self._checks

    def _send(self, cmd: AddCommand | AbortCommand | BacklogCommand | StopCommand | ControlCommand) -> None:
        self._commands.put(cmd)
        self._wakeup.set()

    def _forget(self, request_id: str, stream: Stream) -> None:
        """The consumer of `stream` stopped reading: its id is free for another stream (any thread)."""
        stream.listening = False
        with self._lock:
            if self._streams.get(request_id) is stream:  # not a newer stream that reuses the id
                del self._streams[request_id]

    def _interrupted(self) -> bool:
        return self._stopping or self._dead_error is not None

    def _apply_commands(self) -> None:
        deferred, self._deferred = self._deferred, []
        for cmd in deferred:  # control calls waiting for started requests (rl_calls.waits): in their order
            self._run_control(cmd)
        # Aborts are gathered and ended together (`_end` of them all: one pass over each scheduler's queues), not
        # one by one: a client that hangs up a batch of B prompts x n samples sends B x n aborts at once, and ending
        # them one at a time rescanned the waiting queue per abort (quadratic, on this thread, every user's steps
        # stalled: issue 76 item 2). Their order against the other commands is kept where it matters: they are
        # ended before an add of an id among them (that add is a new request), a stop, or a control call.
        aborts: dict[str, None] = {}
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                if aborts:
                    self._end(list(aborts), "abort")
                return
            if isinstance(cmd, AbortCommand):
                aborts[cmd.request_id] = None
                continue
            if isinstance(cmd, BacklogCommand):  # no need to end the aborts first: an ended id is ignored
                if self._in_core.get(cmd.request_id) is cmd.stream:
                    self.engine.set_backlogged(cmd.request_id, cmd.backlogged)
                continue
            if aborts and (not isinstance(cmd, AddCommand) or cmd.processed.request_id in aborts):
                self._end(list(aborts), "abort")
                aborts = {}
            if isinstance(cmd, AddCommand):
                try:
                    self.engine.add_core(cmd.processed)
                except Exception as exc:  # e.g. a duplicate id: fail this request only
                    cmd.stream.put(exc)
                    continue
                self._in_core[cmd.processed.request_id] = cmd.stream
                self._outputs.put(cmd)
            elif isinstance(cmd, ControlCommand):
                self._run_control(cmd)
            elif isinstance(cmd, StopCommand):
                if self._in_core.get(cmd.request_id) is cmd.stream:
                    del self._in_core[cmd.request_id]
                    self.engine.finish_stopped([cmd.request_id])

    def _run_control(self, cmd: ControlCommand) -> None:
        """Run a control call now, or keep it for a later pass while it waits for started requests."""
        if cmd.ordered and (self._deferred or waits(self.engine, cmd)):  # behind an earlier waiting call, or waiting
            self._deferred.append(cmd)
            return
        run_control(self.engine, cmd, lambda ids: len(self._end_counted(ids)))

    def _end_counted(self, request_ids) -> list[str]:
        """`_end` with reason "abort", returning the ids it ended (pause_generation's abort mode)."""
        ids = [r for r in request_ids if r in self._in_core]
        self._end(ids, "abort")
        return ids

    def _end(self, request_ids, reason: str, deliver: bool = True) -> None:
        """End requests in the core (KV freed); their final outputs come from the output thread, after the
        tokens queued before them."""
        ended = self.engine.abort_core(request_ids, reason)
        for rid in ended:
            self._in_core.pop(rid, None)
        if ended:
            self._outputs.put(FinishOutputs(ended, reason, deliver))

    def _hand_off(self, core_outputs: list[EngineCoreOutput]) -> None:
        """The LLMEngine's output sink (engine thread, inside a step): the step's core outputs to the output
        thread. Never waits: `_run` waited for room in the FIFO before the step."""
        if not core_outputs:
            return
        for co in core_outputs:
            if co.finish_reason is not None:
                self._in_core.pop(co.request_id, None)
        self._outputs.put(StepOutputs(core_outputs))

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self._dead_error is not None:  # the output thread failed, or the watchdog gave up
                    raise self._dead_error
                self._apply_commands()
                if self.engine.has_requests():
                    # Back-pressure: outside the step (and its watchdog), so a slow consumer is no hung step.
                    self._outputs.wait_for_room(self._interrupted)
                    if self._interrupted():
                        continue
                    self._watchdog.step_began()
                    self.engine.step()  # its outputs go to the output thread (_hand_off)
                    self._watchdog.step_done()
                    if self._dead_error is not None:  # the watchdog gave up on this step while it ran
                        raise self._dead_error
                else:
                    self.engine.check_health()  # a rank lost while idle kills the engine now, not at the next request
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
            # Shutdown: refuse new requests (generate checks dead_error under the
            # lock), then whatever is still running ends with reason "abort".
            with self._lock:
                self._dead_error = EngineDeadError("engine is shut down")
            self._apply_commands()
            self._end(self.engine.request_ids(), "abort")
        except BaseException as exc:  # the engine is dead: fail everyone, hang no one
            self._watchdog.step_failed()
            if self._dead_error is None:
                if self._stopping:  # shutdown stopped the ranks under a step that had not ended
                    logger.warning("engine loop stopped inside a step at shutdown: %s", exc)
                else:
                    logger.exception("engine loop failed")
            self._die(exc)
            try:
                self._end(self.engine.request_ids(), "error", deliver=False)  # the streams have the error
            except Exception:
                logger.exception("could not free requests after the engine failed")
        finally:
            for cmd in self._deferred:  # control calls still waiting: their callers must not wait for ever
                if not cmd.future.done():
                    cmd.future.set_exception(EngineDeadError("engine stopped before the call ran"))
            self._deferred = []
            # The output thread ends once it has delivered what is queued (shutdown's aborts included).
            self._outputs.close()
            self._output.join(_OUTPUT_DRAIN_TIMEOUT_S)

    # -- output thread's reports (engine/api/output_thread.py) ----------------------
    def _stopped(self, request_id: str, stream: Stream) -> None:
        self._send(StopCommand(request_id, stream))

    def _stream_lost(self, request_id: str, stream: Stream, finished: bool) -> None:
        # Its consumer's loop closed without closing the generator: free the request
        # here rather than let one client kill the output thread.
        self._forget(request_id, stream)
        if not finished:
            self._send(AbortCommand(request_id))

    def _output_failed(self, exc: BaseException) -> None:
        err = EngineDeadError(f"output thread failed: {reason_of(exc)}")
        err.__cause__ = exc
        self._die(err)

    def _die(self, exc: BaseException) -> None:
        """Record the first fatal error and fail every stream with it (from any thread). It is kept as an
        EngineDeadError naming its reason: `dead_error` goes into every later refusal and health message."""
        if not isinstance(exc, EngineDeadError):
            err = EngineDeadError(f"engine loop failed: {reason_of(exc)}")
            err.__cause__ = exc
            exc = err
        with self._lock:
            if self._dead_error is None:
                self._dead_error = exc
            exc = self._dead_error
            streams = list(self._streams.values())
        # The engine thread may be waiting for room in the FIFO, or idle: it ends at once.
        self._outputs.wake()
        self._wakeup.set()
        for stream in streams:
            stream.put(exc)

    # -- the step watchdog's report (engine/api/step_watchdog.py) ---------------
    def _step_hung(self, message: str) -> None:
        err = EngineDeadError(message)
        logger.error("%s; failing every request", err)
        self._die(err)

