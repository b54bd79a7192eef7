"""The step watchdog: a thread that times the engine thread's steps and kills the engine when one hangs.

A step that runs longer than the step timeout (`--step-timeout`; the first step, which compiles kernels, gets
at least FIRST_STEP_TIMEOUT_S) is reported to `on_hung`: the AsyncEngine (engine/api/async_engine.py) then
goes NOT_SERVING and ends every stream with EngineDeadError naming the reason. A multi-rank executor enforces
the same bound itself (and stops its ranks); this one also covers a single rank, whose hung step nothing else
can see. It lives apart from the AsyncEngine because it is its own thread with its own small state (when the
running step began, how many steps ended), told only when a step begins and ends.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ..config.timeouts import FIRST_STEP_TIMEOUT_S

# The executor's own step watchdog fires first when it has one (its error names the rank): this one
# waits that much longer (at most half the budget).
_WATCHDOG_MARGIN_S = 5.0
_WATCHDOG_POLL_S = 0.25


class StepWatchdog:
    def __init__(self, step_timeout_s: Callable[[], float], running: Callable[[], bool],
                 on_hung: Callable[[str], None]):
        """`step_timeout_s`: the step budget (read at each poll); `running`: False once the engine thread ended
        or the engine died (the watchdog then ends); `on_hung`: called once, from the watchdog's thread, with
        what to tell the streams of a step past its budget."""
        self._step_timeout_s = step_timeout_s
        self._running = running
        self._on_hung = on_hung
        self._step_started: float | None = None  # monotonic time the running step began
        self._steps_done = 0
        # Set by close: the watchdog wakes at once and ends, and close joins it. A watchdog left sleeping would
        # hold the last reference to its engine until interpreter exit and free its tensors there, on a daemon
        # thread (torch aborts: "terminate called without an active exception").
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="moelink-step-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the engine thread's reports -------------------------------------------
    def step_began(self) -> None:
        self._step_started = time.monotonic()

    def step_done(self) -> None:
        self._step_started = None
        self._steps_done += 1

    def step_failed(self) -> None:
        """The step raised (or the loop ended inside it): nothing runs any more."""
        self._step_started = None

    def close(self, timeout: float) -> None:
        """Stop watching and join the thread (unless called from it)."""
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the watchdog's thread -------------------------------------------------
    def _budget(self) -> float:
        timeout = self._step_timeout_s()
        return max(timeout, FIRST_STEP_TIMEOUT_S) if self._steps_done == 0 else timeout

    def _watch(self) -> None:
        """A step running past its budget kills the engine (health, streams)."""
        while self._running():
            if self._closed.wait(_WATCHDOG_POLL_S):
                return
            started = self._step_started
            budget = self._budget()
            if started is None or time.monotonic() - started <= budget + min(_WATCHDOG_MARGIN_S, budget / 2):
                continue
            self._on_hung(f"the engine is hung: a step has run for more than {budget:g} s (--step-timeout)")
            return
