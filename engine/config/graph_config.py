"""Which decode batch sizes get a CUDA graph: configuration only, apart from the capture machinery
(`cuda_graph.py`), so that the engine's options can be validated without loading model code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: the device is read by its `.type`
    import torch

# vLLM-like buckets: fine steps where padding is a large share of the batch, coarser above.
_DEFAULT_MAX = 512


def default_graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 to 64, every 16 to 256, every 32 to 512; capped at max_num_seqs, which is
    always included so every decode batch the scheduler can form has a graph."""
    top = min(max_num_seqs, _DEFAULT_MAX)
    sizes = {1, 2, 4} | set(range(8, 65, 8)) | set(range(80, 257, 16)) | set(range(288, _DEFAULT_MAX + 1, 32))
    return tuple(sorted({s for s in sizes if s <= top} | {top}))


@dataclass(frozen=True)
class CudaGraphConfig:
    """Which decode batch sizes get a CUDA graph; empty = every step eager (vLLM's --enforce-eager)."""

    batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.batch_sizes, tuple):
            raise ValueError(f"cuda_graph_sizes={self.batch_sizes!r} is invalid: must be a list of positive batch sizes.")
        for s in self.batch_sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ValueError(f"cuda_graph_sizes contains {s!r}: every size must be a positive integer.")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"cuda_graph_sizes={list(self.batch_sizes)} is invalid: sizes must be distinct.")
        object.__setattr__(self, "batch_sizes", tuple(sorted(self.batch_sizes)))

    @property
    def enabled(self) -> bool:
        return bool(self.batch_sizes)

    @classmethod
    def resolve(cls, enforce_eager: bool, sizes: list[int] | tuple[int, ...] | None, max_num_seqs: int,
                device: torch.device) -> "CudaGraphConfig":
        """The engine's choice: off on CPU or with enforce_eager; the given sizes (an empty list: no
        graphs), else the defaults."""
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager={enforce_eager!r} is invalid: must be True or False.")
        # Given sizes are validated even where graphs end up off: bad input is an error everywhere.
        cfg = cls(tuple(sizes)) if sizes is not None else cls(default_graph_sizes(max_num_seqs))
        too_big = [s for s in cfg.batch_sizes if s > max_num_seqs]
        if too_big:
            raise ValueError(f"cuda_graph_sizes contains {too_big[0]}, above max_num_seqs={max_num_seqs}: "
                             "a decode batch is never that large; give sizes <= max_num_seqs.")
        return cls(()) if enforce_eager or device.type != "cuda" else cfg
