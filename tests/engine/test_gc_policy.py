"""engine/contract/gc_policy.py: freezing the heap never deadlocks on an engine's own finalizer.

An `LLM` dropped without `shutdown()` thaws the heap from a weakref finalizer; the collector runs finalizers in
whichever thread collects, and `freeze_heap` collects. Before the fix that thread held the policy's lock and
waited on it again in `thaw_heap`: a hang (CI lost 600 s to it in one test).
"""
from __future__ import annotations

import pytest

import gc
import threading
import weakref

from moelink.engine.contract import gc_policy

COLLECTOR_CHECKED = True  # these tests are about the heap's freezing: none held frozen here (tests/conftest.py)


def _finishes(fn, timeout_s: float) -> bool:
    """Run `fn` in a daemon thread: True once it returned, False if it still runs after `timeout_s` (a hang)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
        done.set()

    threading.Thread(target=target, daemon=True).start()
    finished = done.wait(timeout_s)
    if errors:
        raise errors[0]
    return finished


class _InACycle:
    """Freed only by the cycle collector, so its finalizer runs inside somebody's gc.collect()."""

    def __init__(self):
        self.me = self


def test_a_finalizer_that_thaws_the_heap_inside_the_freeze_collection_does_not_deadlock():
    token = object()  # the holder key thaw_heap is called with (an engine, in the engine)
    finalized = threading.Event()

    def scenario():
        gc_policy.freeze_heap(token)
        obj = _InACycle()  # made after the freeze: collectable
        weakref.finalize(obj, lambda: (gc_policy.thaw_heap(token), finalized.set()))
        del obj
        gc_policy.freeze_heap(None)  # collects: the finalizer thaws in this very thread
        assert finalized.is_set()
        assert id(token) not in gc_policy._holders

    try:
        assert _finishes(scenario, timeout_s=20.0), "freeze_heap deadlocked on a finalizer that thaws the heap"
    finally:
        gc.unfreeze()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_an_llm_dropped_in_a_cycle_is_finalized_by_the_next_engine_start(tiny_model):
    from moelink.engine import LLM

    path = tiny_model("qwen3_e6k3")
    kw = dict(dtype="float32", device="cpu", max_num_seqs=2, num_kv_blocks=16, block_size=16)

    def scenario():
        first = LLM(path, **kw)
        # The engine shut down by itself (what a server's shutdown path does): the heap thaws, and the LLM, still
        # holding its finalizer, is collectable again; in a cycle only a collection finalizes it.
        first.engine.shutdown()
        # Other engines this process still holds (earlier tests in the same worker) keep the heap frozen, and a
        # frozen LLM is never collected: thaw it as the last holder's shutdown would.
        gc.unfreeze()
        first.me = first
        finalizer = first._finalizer
        del first
        second = LLM(path, **kw)  # its start-up freezes the heap: collects, the first LLM's finalizer runs
        assert not finalizer.alive
        second.shutdown()

    assert _finishes(scenario, timeout_s=120.0), "an engine start deadlocked on another engine's finalizer"


def test_the_thaw_at_exit_is_registered_by_the_first_freeze_not_by_the_import(monkeypatch):
    """A process that froze its heap here thaws it at exit (interpreter shutdown then frees everything as it would
    have); one that only imported the module (a child forked from a process that imported it: the test zygote's)
    keeps its exit's collection to what it made itself, so nothing is registered before a freeze."""
    import atexit

    registered = []
    monkeypatch.setattr(gc_policy, "_thaw_registered", False)
    monkeypatch.setattr(atexit, "register", lambda fn, *a, **kw: registered.append(fn))
    gc_policy.thaw_heap(object())  # a thaw alone registers nothing
    assert registered == []
    token = object()
    gc_policy.freeze_heap(token)
    gc_policy.thaw_heap(token)
    gc_policy.freeze_heap(token)  # once only
    gc_policy.thaw_heap(token)
    assert registered == [gc.unfreeze]
