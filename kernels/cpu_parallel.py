"""Independent row ranges of one native CPU kernel call run on torch's intra-op threads.

A ctypes call releases the GIL for as long as the C function runs, so a kernel whose rows are independent (paged
attention: one sequence's rows read only its own keys) can run one contiguous range of sequences per thread, each
range a call of its own with its pointers offset. torch's own ops use `torch.get_num_threads()` threads; the native
kernels are single-threaded C, so without this a decode step's attention ran on one of the two cores the step's
linears use (1,024 sequences: ~4 ms of a ~20 ms step). Each row is computed by the same code whatever the split, so
results do not depend on it. A rank given one thread (the multiprocess executor's, `cpu_reserved_cores`) splits
nothing.

The helper threads are made at first use and again in a forked child (threads do not survive a fork).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# Below this much work (the kernel's own unit: elements read) one call is cheaper than waking a thread (~20-40 us).
MIN_SPLIT_WORK = 1 << 19

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_size = 0


def split_points(costs: list[int], parts: int) -> list[int]:
    """Boundaries [0, b1, ..., len(costs)] of at most `parts` contiguous ranges of about equal total cost (ranges may
    not be empty; fewer when there are fewer items)."""
    n = len(costs)
    parts = max(1, min(parts, n))
    total = sum(costs)
    bounds, acc, k = [0], 0, 1
    for i, c in enumerate(costs):
        acc += c
        if k < parts and acc * parts >= total * k and i + 1 < n:
            bounds.append(i + 1)
            k += 1
    bounds.append(n)
    return bounds


def even_points(n: int, parts: int) -> list[int]:
    """Boundaries of at most `parts` contiguous ranges of about n / parts items each (none empty)."""
    parts = max(1, min(parts, n))
    return [n * i // parts for i in range(parts + 1)]


def threads_for(work: int) -> int:
    """How many threads a call of `work` units should use: torch's intra-op count, or 1 below MIN_SPLIT_WORK."""
    return 1 if work < MIN_SPLIT_WORK else max(1, torch.get_num_threads())


def run_ranges(call: Callable[[int, int], int], bounds: list[int]) -> list[int]:
    """call(lo, hi) for each range of `bounds`, the first on this thread and the others on helper threads; returns
    their results in range order (every call runs to its end, also when another fails)."""
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if len(ranges) == 1:
        return [call(*ranges[0])]
    pool = _helpers(len(ranges) - 1)
    futures = [pool.submit(call, lo, hi) for lo, hi in ranges[1:]]
    first = call(*ranges[0])
    return [first, *(f.result() for f in futures)]


def _helpers(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_pid, _pool_size
    with _lock:
        if _pool is None or _pool_pid != os.getpid() or _pool_size < n:
            # A pool made before a fork has no threads in the child: a new one (the old object is dropped, not shut
            # down, as its threads are not this process's).
            _pool, _pool_pid, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="moelink-native"), os.getpid(), n
        return _pool


__all__ = ["MIN_SPLIT_WORK", "even_points", "run_ranges", "split_points", "threads_for"]
