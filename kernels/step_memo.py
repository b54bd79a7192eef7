"""Per-step memos for the plain-torch kernels: what every layer of a step would recompute from the same inputs
(the decode gather plan from the block tables and lengths, the rotary rows of the step's positions) is computed
by the first layer and reused by the others.

Why: on a CPU a small batch's forward is op dispatch (each torch op costs 1-10 us whatever its size), and these
derived tensors are a third of a decode layer's ops when each layer builds them again. The Triton kernels derive
most of them inside their launch; the one launch of their own, the decode kernels' split plan
(kernels/triton_split_plan.py), is memoized here too: one plan launch a step (and a captured graph) instead of
one a layer.

A memo is keyed by its input tensors: their identity and their version counter (`Tensor._version`, bumped by
every in-place write outside inference mode). Inference tensors have no version counter, so the model runner
clears the memo as each step's device work starts (`StepMemo.clear`): a buffer refilled in place for the next
step is never served an entry of the last one. Within a step the inputs these memos read (the metadata, the
positions) are not written. The memo holds its key tensors, so an id is not reused while its entry lives; it
keeps the last few entries only (a step's full and sliding metadata, a drafter's chain), so it holds no step's
tensors past the next few. Nothing derived from weights is memoized (an in-place weight update under inference
mode bumps no version).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

V = TypeVar("V")

# Entries kept per memo: a step's full and sliding-window metadata, both dtypes of a mixed model, a drafter's
# chained steps; beyond that the oldest goes.
_MAX_ENTRIES = 8


class StepMemo:
    """A small LRU of values derived from tensors, keyed by (tag, the tensors' identities and versions, extra).
    One per thread (each rank's forward runs on its own thread in tests that run several ranks in one process)."""

    def __init__(self, max_entries: int = _MAX_ENTRIES):
        self.max_entries = max_entries
        self._local = threading.local()

    def _entries(self) -> OrderedDict:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        return entries

    def get(self, tag: str, tensors: tuple[torch.Tensor, ...], extra: Hashable, make: Callable[[], V]) -> V:
        """The value `make()` computed for these tensors at their current versions (and `extra`), made now if
        there is none."""
        key = (tag, tuple((id(t), _version(t)) for t in tensors), extra)
        entries = self._entries()
        hit: tuple[tuple[torch.Tensor, ...], Any] | None = entries.get(key)
        if hit is not None:
            entries.move_to_end(key)
            return hit[1]
        value = make()
        # The key tensors' versions are read again: `make` must not write them (it would key a stale entry).
        entries[key] = (tensors, value)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every entry (this thread's): the model runner calls it as each step's device work starts, so
        an inference tensor (which has no version counter) refilled in place for the next step is never read
        from an old entry."""
        self._entries().clear()


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter; -1 for an inference tensor, which has none (StepMemo.clear covers it)."""
    if t.is_inference():
        return -1
    return t._version


STEP_MEMO = StepMemo()

__all__ = ["STEP_MEMO", "StepMemo"]
