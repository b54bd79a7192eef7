"""Count device→host syncs in a stretch of code, on CPU, by wrapping what would sync on a GPU.

On a CPU nothing waits, so the test counts the calls that on CUDA read device memory from the host: scalar and
list reads (`item`, `tolist`, `__bool__`, `__int__`, `__float__`, `__index__`), copies to the host (`cpu`,
`numpy`) and ops whose output size depends on the data (`nonzero`, `unique`, `bincount`, `masked_select`).
`counting()` switches counting on (nestable); `paused()` switches it off inside, for code a test excludes (the
CPU reference expert kernel, whose per-expert loop is the CPU path; the Triton kernels have none).
"""
from __future__ import annotations

import contextlib
import functools
import traceback

import torch

_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
            "masked_select")
_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select")


class HostSyncCounter:
    def __init__(self):
        self.count = 0
        self.where: list[str] = []
        self._depth = 0
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            if self._depth > 0:
                self.count += 1
                self.where.append(f"{name} at {traceback.extract_stack(limit=3)[0].name}")
                self._depth -= 1  # a sync op that calls another one counts once
                try:
                    return real(*args, **kwargs)
                finally:
                    self._depth += 1
            return real(*args, **kwargs)

        self._saved.append((owner, name, real))
        setattr(owner, name, wrapper)

    def __enter__(self) -> "HostSyncCounter":
        for name in _METHODS:
            self._wrap(torch.Tensor, name)
        for name in _FUNCTIONS:
            self._wrap(torch, name)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self):
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def paused(self):
        depth, self._depth = self._depth, 0
        try:
            yield
        finally:
            self._depth = depth


def count_moe_layer_syncs(model, counter: HostSyncCounter) -> list[int]:
    """Wrap every MoE layer of `model` (MoELayer modules) so its forward counts syncs into a per-layer list
    (returned, filled as the layers run), with the expert kernel itself paused."""
    from moelink.moe.layer import MoELayer

    per_layer: list[int] = []
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        fwd, fmt = module.forward, module.expert_format
        run = fmt.run

        def paused_run(*a, _run=run, **k):
            with counter.paused():
                return _run(*a, **k)

        def counted(x, _fwd=fwd):
            before = counter.count
            with counter.counting():
                out = _fwd(x)
            per_layer.append(counter.count - before)
            return out

        def counted_stages(x, _stages=module.stages):
            # The decoder drives MoE layers as stage generators (two-batch overlap interleaves them): count
            # only while this layer's own code runs, one entry per layer once its generator finishes.
            gen, n = _stages(x), 0
            while True:
                before = counter.count
                try:
                    with counter.counting():
                        value = next(gen)
                except StopIteration as stop:
                    per_layer.append(n + counter.count - before)
                    return stop.value
                n += counter.count - before
                yield value

        fmt.run = paused_run
        if hasattr(module, "stages"):
            module.stages = counted_stages  # forward runs the stages too: wrapping both would count twice
        else:
            module.forward = counted
    return per_layer
