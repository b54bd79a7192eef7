"""Bounded waits with a clear error.

`wait_until` is the suite's one polling loop: for a condition only a subprocess or a remote server can
answer (its log, its RPCs, /proc, Ray's resources), where there is no event to wait on. Anything the test
process itself can be told about (a thread, a future, an engine step, a stream) is waited on with an
event instead: `wait_event`, `EngineSteps` (tests.helpers.engine_steps), `Thread.join`, `Popen.wait`.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A bounded wait ran out (an AssertionError, so pytest shows it as the test's failure)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               detail: Callable[[], str] | None = None) -> T:
    """Call `predicate()` every `interval` s until it returns something truthy, and return that.

    After `timeout` s raises WaitTimeout naming `what` (plus `detail()`, e.g. a log tail, when given).
    Exceptions of `predicate` propagate: a predicate may fail fast (e.g. "the server exited").
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {value!r}){extra}")
        time.sleep(interval)


def wait_event(event: threading.Event, timeout: float, what: str) -> None:
    """`event.wait(timeout)`, raising WaitTimeout naming `what` when it is not set in time."""
    if not event.wait(timeout):
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")


def join_threads(threads, timeout: float, what: str) -> None:
    """Join every thread within one shared `timeout`; WaitTimeout naming `what` if any is still alive."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (still running: {alive})")
