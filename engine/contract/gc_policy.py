"""The Python garbage collector and a serving process: freeze what start-up built, so collections skip it.

An engine holds a few hundred thousand long-lived objects once it has started (modules, parameters, kernel
caches, the tokenizer, gRPC and asyncio state). The step loop allocates short-lived objects by the thousand per
step, and every so many of those the collector's oldest generation scans *all* tracked objects: measured on the
host-overhead benchmark (256 sequences, 1 layer), a 100 ms pause every few dozen steps, which doubled the mean
host time per step (16 us per sequence against 9 with the heap frozen). `gc.freeze()` after start-up moves
everything alive then into the permanent generation (what vLLM and SGLang do once their engine is up), so a
collection only walks what serving created since.

Frozen objects are never collected while frozen: garbage cycles among them would stay until `gc.unfreeze()`.
The engine thaws the heap when the last engine of the process shuts down (tests build hundreds of engines in one
process), and freezes again after every start; a process that froze it thaws it at exit, so interpreter shutdown
frees everything as it would have (extension modules such as Triton's report objects still alive then as leaks).
"""
from __future__ import annotations

import atexit
import gc
import logging
import threading

logger = logging.getLogger(__name__)

# Re-entrant: a collection can run any object's finalizer in the thread that holds the lock (gc.collect() below,
# or any allocation inside the `with`), and an engine dropped without `shutdown()` thaws the heap from its
# weakref finalizer. With a plain Lock that thread waited on itself forever (seen in CI: a test hung 600 s
# in `thaw_heap` called from `freeze_heap`'s collection).
_lock = threading.RLock()
_holders: set[int] = set()


def freeze_heap(holder: object | None = None) -> None:
    """Collect, then freeze every object alive now. `holder` (an engine) keeps the heap frozen until it calls
    `thaw_heap`; without one (a worker process's own start-up) the freeze lasts for the process."""
    # Collect outside the lock: finalizers of dead engines run here and take the lock themselves.
    gc.collect()
    with _lock:
        gc.freeze()
        if holder is not None:
            _holders.add(id(holder))
        _thaw_at_exit()
    # Counted only for the debug log: gc.get_freeze_count() walks the whole permanent generation (CPython keeps no
    # count), 20-50 ms with torch and transformers imported, paid at every engine start otherwise.
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("gc: %d start-up objects frozen", gc.get_freeze_count())


def thaw_heap(holder: object) -> None:
    """`holder` is gone: unfreeze once no engine of this process holds the heap frozen (its garbage is
    collectable again)."""
    with _lock:
        _holders.discard(id(holder))
        if not _holders:
            gc.unfreeze()


# A Ray rank process parked for the next engine (engine/cluster/rank_pool.py, Worker.park) used to thaw and collect its
# whole heap at every park, to free what of the old engine only the cycle collector frees: ~0.17 s of CPU a park
# (~220,000 objects walked: torch's, Ray's and moelink's imports), measured at 0-430 objects found (small cycles: the
# runner, its model and its KV cache always went by reference counting), ~300 parks a tests/ep run. Now a park whose
# engine state provably went (no weak reference to it alive) keeps the heap frozen and its few cyclic leftovers with
# it, and one park in PARK_FULL_COLLECTION_EVERY collects the whole heap as before, so what is left frozen is bounded
# by that many engines' leftovers; a park whose engine state is still alive (held in a cycle) always collects.
PARK_FULL_COLLECTION_EVERY = 8
_parks_without_collection = 0


def park_keeps_heap_frozen(engine_state_gone: bool) -> bool:
    """Whether a parking rank process may skip its full collection (the comment above); counts the parks that did."""
    global _parks_without_collection
    with _lock:
        if engine_state_gone and _parks_without_collection < PARK_FULL_COLLECTION_EVERY - 1:
            _parks_without_collection += 1
            return True
        _parks_without_collection = 0
        return False


_thaw_registered = False


def _thaw_at_exit() -> None:
    """A process that froze its heap here thaws it at exit (the module docstring), registered at its first freeze, not
    at import: a process that imports this module and never freezes (a forked child of a process that imported it,
    tests/helpers/zygote.py's) keeps its exit as cheap as it was (the thaw makes interpreter shutdown's collection
    walk every module's objects: torch's, transformers', ~0.5 s of CPU)."""
    global _thaw_registered
    if not _thaw_registered:
        _thaw_registered = True
        atexit.register(gc.unfreeze)

__all__ = ["freeze_heap", "thaw_heap", "park_keeps_heap_frozen"]
