"""Event waits on an in-process engine: what its steps did, instead of polling its state.

`EngineSteps(llm_engine)` replaces `llm_engine.step` (an LLMEngine; an AsyncEngine's is `.engine`) by a
wrapper that counts steps and notifies a condition at the start and the end of each one. Install it
before the requests whose end a test waits for: every state change of a request (scheduled, finished,
aborted and reported to the workers) is made inside a step, so `wait_for(predicate)` rechecks the
predicate exactly when it can have changed. It can also hold the engine thread inside a step
(`hold()`, `wait_parked()`, `release()`), for races that need the engine busy at a given moment.
"""
from __future__ import annotations

import threading
from typing import Callable

from .waits import WaitTimeout


class EngineSteps:
    def __init__(self, llm_engine, park_timeout: float = 30.0):
        self._engine = llm_engine
        self._real_step = llm_engine.step
        self._own_attr = "step" in vars(llm_engine)  # already wrapped by someone: put that back on close
        self._cond = threading.Condition()
        self._hold = threading.Event()
        self._go = threading.Event()
        self._parked = threading.Event()
        self._park_timeout = park_timeout
        self.started = 0  # steps entered
        self.finished = 0  # steps returned (or raised)
        llm_engine.step = self._step

    def _step(self):
        with self._cond:
            self.started += 1
            self._cond.notify_all()
        if self._hold.is_set():
            self._parked.set()
            self._go.wait(self._park_timeout)
        try:
            return self._real_step()
        finally:
            with self._cond:
                self.finished += 1
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str):
        """Return `predicate()` once truthy: checked now and after every step; WaitTimeout naming `what`."""
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
        if not value:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} "
                              f"({self.finished} engine steps done)")
        return value

    # -- holding the engine thread inside a step ---------------------------------
    def hold(self) -> None:
        """The next step parks (before running) until release()."""
        self._go.clear()
        self._parked.clear()
        self._hold.set()

    def wait_parked(self, timeout: float = 30.0) -> bool:
        """Block until the engine thread is parked inside a step (True), or `timeout` s (False)."""
        return self._parked.wait(timeout)

    def release(self) -> None:
        self._hold.clear()
        self._go.set()

    def close(self) -> None:
        """Give the engine its own step back (steps in flight finish through the wrapper)."""
        self.release()
        if vars(self._engine).get("step") == self._step:
            if self._own_attr:
                self._engine.step = self._real_step
            else:
                del self._engine.step

    def __enter__(self) -> "EngineSteps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
