"""A weight plan's entry: where one checkpoint tensor goes (the contract of every module's `weight_plan`).

`weight_plan(...)` returns `{checkpoint name: PlanEntry}`; engine/rank/loader.py fills each destination from the
checkpoint (engine/rank/dummy_weights.py with random values, engine/rank/keep_runner.py a part of a plan).
"""
from __future__ import annotations

from typing import Any, NamedTuple


class PlanEntry(NamedTuple):
    """One checkpoint tensor's destination."""

    dest: Any  # the parameter or tensor to fill, or a QuantizeOnLoad (moe/expert_weights.py) for a float->FP8 load
    index: tuple = ()  # where in `dest` (basic/advanced index; () = all of it)
    source: tuple = ()  # which part of the checkpoint tensor to read, in what row order (() = all, as stored)


WeightPlan = dict[str, PlanEntry]


class Rearranged:
    """A destination that rearranges the tensor read (its `source` part) before copying it into `dest`: a TP rank's
    contiguous columns of gpt-oss's interleaved experts, de-interleaved and transposed after the read
    (engine/tp/experts.py), so the rank reads only its columns. `source`: the checkpoint tensor's (shape,
    dtype) where the plan's index does not tell it (load_format="dummy" makes that tensor; DeepSeek-V4's wo_a scales,
    whose file rows are coarser than the rows held)."""

    def __init__(self, dest, rearrange, source=None):
        self.dest, self.rearrange, self.source = dest, rearrange, source

    def put(self, src, device) -> None:
        t = self.rearrange(src)
        if tuple(t.shape) != tuple(self.dest.shape):
            raise ValueError(f"a checkpoint tensor read as {tuple(t.shape)}, expected {tuple(self.dest.shape)}.")
        self.dest.copy_(t.to(device=device, dtype=self.dest.dtype))


class Part(NamedTuple):
    """A destination that is one named part (`role`) of a tensor assembled from several checkpoint tensors: a weight
    and its scales dequantized together once all are read (engine/rank/fp8_linears.py, nvfp4_linears.py,
    int4_linears.py, DeepSeek-V4's FP8 weights). `target.put(role, src, device)` keeps it until the rest arrive."""

    target: Any
    role: str

    def put(self, src, device) -> None:
        self.target.put(self.role, src, device)


__all__ = ["Part", "PlanEntry", "Rearranged", "WeightPlan"]
