"""Where a step's device work runs relative to the host thread that prepares the next one (one strategy each).

The overlapped step loop (async scheduling) splits a model step in two: host work (the scheduler's output
turned into arrays, sampling parameters gathered) and device work (copies in, forward, sampling, copies
out). The host prepares step N+1 while the device runs step N; a strategy decides how "the device runs":

* `CudaStream`: the device work is *launched* from the host thread, and CUDA runs it asynchronously on the
  current stream; results come back through pinned host buffers and an event the host waits on a step later.
* `InlineStream`: device work runs at once, in the host thread: a CPU rank's stream in both loops. On CUDA the serial loop takes `CudaStream` too: there "at once" only enqueues,
  and the host must wait on the step's event before it reads the sampled tokens from pinned memory (without it,
  garbage ids reached an embedding gather at batch 256, seen on an H200 on 2026-11-25). The serial loop differs
  from the overlapped one in when the engine waits, not in the stream.
* `ThreadStream`: one worker thread plays a CPU device's queue: device work is submitted in order and runs
  there while the host thread goes on. Tests and benchmarks put it on a runner to see the overlapped loop
  overlap on a CPU; `make_stream` never picks it. A CPU rank's forward is many small torch ops with Python
  between them, so the two threads fight for the GIL (and torch's OpenMP threads for the cores): on 2 cores
  `LLM.generate` of 256 x 64 tokens on the 1-layer tiny model took 1.33 s with it against 0.48 s inline, and
  batch 1 2.47 against 1.08 ms a token (2026-11-28; vLLM's CPU worker does not overlap either).
* `SimulatedStream`: a test double of a GPU stream (benchmarks and tests on CPU): launched from the host
  thread like `CudaStream`, then busy for a fixed time per step.

Each `submit(fn)` returns a `DeviceWork` whose `wait()` returns fn's value once the device is done with it.
Work submitted to one stream runs in submission order, so a step reads the previous step's sampled tokens
(device tensors) after they were written: the stream order is the only synchronisation between steps.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch


SWITCH_INTERVAL_S = 2e-4  # the GIL hand-over a CPU stream thread needs (ThreadStream)


class DeviceWork:
    """A submitted piece of device work; `wait()` blocks until the device is done and returns its value."""

    def __init__(self, future: Future | None = None, value=None, event=None, ready_at: float | None = None):
        self._future, self._value, self._event = future, value, event
        self._ready_at = ready_at  # SimulatedStream: when its simulated device finishes this work

    def wait(self, timeout: float | None = None):
        if self._future is not None:
            # host sync: the stream thread ran it (re-raises its error; TimeoutError after `timeout` seconds)
            self._value = self._future.result(timeout)
            self._future = None
        if self._event is not None:
            self._event.synchronize()  # host sync: the GPU finished the step and its copies to pinned memory
            self._event = None
        if self._ready_at is not None:
            delay = self._ready_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # simulated device still busy with it
            self._ready_at = None
        return self._value


class InlineStream:
    """Device work runs in the caller's thread, now (the serial loop on a device whose ops block: the CPU)."""

    name = "inline"
    asynchronous = False

    def submit(self, fn: Callable[[], object]) -> DeviceWork:
        return DeviceWork(value=fn())

    def shutdown(self) -> None:
        pass


class ThreadStream:
    """One thread runs submitted work in order: a CPU device's stand-in for a CUDA stream (tests, benchmarks)."""

    name = "thread"
    asynchronous = True

    def __init__(self, name: str = "moelink-device"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # The stream thread needs the GIL for its Python between torch ops; with the default 5 ms switch
        # interval it waits up to 5 ms each time the host thread runs Python, longer than a whole small step:
        # the two threads then take turns instead of overlapping. A short interval makes the hand-over prompt
        # (process-wide, set once, never raised; CPU devices only: a CUDA stream needs no thread).
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # torch's intra-op threads are per thread: the stream runs ops with what the host thread was given.
        self._num_threads = torch.get_num_threads()

    def _run(self) -> None:
        first = True
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if first:
                torch.set_num_threads(self._num_threads)
                first = False
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiter, which re-raises it in the host thread
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], object]) -> DeviceWork:
        fut: Future = Future()
        self._queue.put((fn, fut))
        return DeviceWork(future=fut)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the thread once the work already submitted has run (joined, bounded: a step stuck in a collective
        with a lost peer is left to the process's exit)."""
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class CudaStream:
    """Launch from the host thread onto the current CUDA stream; an event marks the end of each step's work."""

    name = "cuda"
    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device

    def submit(self, fn: Callable[[], object]) -> DeviceWork:
        value = fn()  # kernels and non-blocking copies enqueued; nothing here waits for the GPU
        event = torch.cuda.Event()
        event.record()
        return DeviceWork(value=value, event=event)

    def shutdown(self) -> None:
        pass


class SimulatedStream:
    """A test double of a GPU stream for CPU benchmarks and tests: work is launched from the host thread (as
    `CudaStream` does: its Python is host time) and then occupies a simulated device for `step_time_s`, one
    step after the other; `wait()` returns when the simulated device is done. So the serial loop's step takes
    host + T, and an overlapped loop's max(host, T)."""

    name = "simulated"
    asynchronous = True

    def __init__(self, step_time_s: float):
        if not step_time_s >= 0:
            raise ValueError(f"SimulatedStream step_time_s={step_time_s!r} is invalid: must be >= 0 seconds.")
        self.step_time_s = step_time_s
        self._free_at = 0.0

    def submit(self, fn: Callable[[], object]) -> DeviceWork:
        value = fn()  # the launch: host time
        self._free_at = max(time.perf_counter(), self._free_at) + self.step_time_s
        return DeviceWork(value=value, ready_at=self._free_at)

    def shutdown(self) -> None:
        pass


def make_stream(device: torch.device):
    """The stream strategy for a rank: CUDA -> its stream (both loops: module docstring); other devices ->
    inline in both loops (the overlapped loop's bookkeeping runs as on CUDA, with nothing to overlap: a thread
    costs a CPU rank more than it hides, see `ThreadStream`)."""
    if device.type == "cuda":
        return CudaStream(device)
    return InlineStream()


__all__ = ["CudaStream", "DeviceWork", "InlineStream", "SimulatedStream", "ThreadStream", "make_stream"]
