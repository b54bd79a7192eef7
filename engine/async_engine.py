"""AsyncEngine: an LLMEngine stepped by a background thread, driven from asyncio.

    engine = AsyncEngine.from_engine_args(EngineArgs(model=path))
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        ...
    await engine.abort("req-1")

The engine thread owns the LLMEngine: callers only enqueue commands (add,
abort), so the scheduler is never touched from two threads. Outputs go to a
per-request asyncio.Queue on the caller's loop. When the consumer stops
iterating (break, cancellation, client disconnect) the request is aborted and
its KV blocks freed within one step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from .engine_args import EngineArgs
from .llm_engine import LLMEngine, ProcessedRequest, PromptType
from .outputs import OutputKind, RequestOutput
from .safe_text import shown
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight request ends with this error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # Set by the engine thread once this stream's request is in the engine. A caller may
    # reuse an id the moment its previous stream ended, while that request's abort is
    # still queued: until then, outputs under the id are the old request's, not ours.
    live: bool = False

    def put(self, item) -> bool:
        """False if the consumer's event loop is closed (nobody will ever read)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            return False
        return True


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moelink-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(LLMEngine.from_engine_args(args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._thread.is_alive()

    # -- public API -------------------------------------------------------------
    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                       output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request. Raises ValueError for bad input before anything is queued."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        gen = self.generate_processed(self.engine.process_inputs(request_id, prompt, params), output_kind)
        async with contextlib.aclosing(gen):  # closing this closes (and so aborts) the request at once
            async for out in gen:
                yield out

    async def generate_processed(self, processed: ProcessedRequest,
                                 output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """`generate` for a request `LLMEngine.process_inputs` already validated (the server validates
        once per request, whatever its number of samples)."""
        request_id = processed.request_id
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id={shown(request_id)} is already in use by a running request.")
            self._streams[request_id] = stream
            if self.dead_error is not None:
                self._streams.pop(request_id, None)
                raise EngineDeadError(f"engine is not running: {self.dead_error}")
            # Under the lock: the engine thread's last command drain (shutdown)
            # then either sees this add or this call sees dead_error.
            self._send(("add", processed, output_kind, stream))
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
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """End a request with finish_reason 'abort'; its stream gets a final output."""
        self._send(("abort", request_id))

    def stats(self):
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
        self.engine.shutdown()

    # -- engine thread ----------------------------------------------------------
    def _send(self, cmd) -> None:
        self._commands.put(cmd)
        self._wakeup.set()

    def _deliver(self, outputs) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None or not stream.live:
                continue
            if not stream.put(out):
                # Its consumer's loop closed without closing the generator: free
                # the request here rather than let one client kill the engine thread.
                with self._lock:
                    self._streams.pop(out.request_id, None)
                if not out.finished:
                    self._send(("abort", out.request_id))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, processed, kind, stream = cmd
                try:
                    self.engine.add_processed(processed, kind)
                except Exception as exc:  # e.g. a duplicate id: fail this request only
                    stream.put(exc)
                    continue
                with self._lock:
                    # Only the stream that sent this add, and only if still listening.
                    stream.live = self._streams.get(processed.request_id) is stream
            else:
                self._deliver(self.engine.abort_requests([cmd[1]]))

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if self.engine.has_requests():
                    self._deliver(self.engine.step())
                else:
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
            # Shutdown: refuse new requests (generate checks dead_error under the
            # lock), then whatever is still running ends with reason "abort".
            with self._lock:
                self.dead_error = EngineDeadError("engine is shut down")
            self._apply_commands()
            self._deliver(self.engine.abort_requests(list(self.engine.output_processor.states)))
        except BaseException as exc:  # the engine is dead: fail everyone, hang no one
            logger.exception("engine loop failed")
            self.dead_error = exc
            err = EngineDeadError(f"engine loop failed: {exc}")
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:
                stream.put(err)
            try:
                self.engine.abort_requests(list(self.engine.output_processor.states), reason="error")
            except Exception:
                logger.exception("could not free requests after the engine failed")
