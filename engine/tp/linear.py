"""How a Linear is split over a tensor-parallel group: one strategy object per choice, behind the Linear seam.

Legend: T tokens, K input features, N output features (rows); Bn, Bk an FP8 block's rows and columns.

- `Replicated`: every rank holds the whole weight (the default; every linear at TP 1).
- `ColumnParallel`: each rank holds some rows of each stacked piece (qkv / gate_up / MLA's q_b, kv_b): its output
  is its heads' (or its intermediate columns') share, used as it is by the next, row-parallel, linear. A piece
  every rank needs whole sits in the same stack as rows [0, its width) (MLA's kv_a beside a per-head q_proj).
- `OwnRows`: each rank holds the checkpoint rows its layer lists, in the layer's order (gated DeltaNet: a rank's
  heads are scattered over its stacked projections' pieces, and one checkpoint tensor fills several pieces).
- `RowParallel`: each rank holds some input columns (o_proj, down_proj); the partial outputs are summed over the
  group (one all-reduce of [T, N]) and the bias is added once, after the sum.

Each strategy says which part of the checkpoint tensor a rank reads (`source`: slices read alone through
safetensors' get_slice, so a rank reads only its shard) and, for FP8 block-scaled weights, which block rows or
columns of `weight_scale_inv` go with it (a shard starts and ends on block boundaries:
engine/config/tensor_parallel.check_tensor_parallel refuses a split that does not).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .group import TensorParallel


class LinearParallel(Protocol):
    """The seam where a `Linear` (engine/models/linear.py) meets tensor parallelism: which part of a checkpoint
    tensor (and of its FP8 block scales) this rank reads, and what its output needs after the matmul."""

    name: str  # shown in the Linear's repr

    def source(self, piece: int, rows: tuple) -> tuple: ...  # the checkpoint index stacked piece `piece` reads

    def scale_source(self, piece: int, block: tuple[int, int]) -> tuple: ...  # its block scales' index

    def finish(self, y_TN: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor: ...  # collective + bias


class Replicated:
    """The whole weight on every rank."""

    name = "replicated"

    def source(self, piece: int, rows: tuple) -> tuple:
        return rows

    def scale_source(self, piece: int, block: tuple[int, int]) -> tuple:
        return ()

    def finish(self, y_TN: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        return y_TN if bias_N is None else y_TN + bias_N


class ColumnParallel:
    """Rows [row_starts[i], row_starts[i] + piece i's local width) of each stacked piece's checkpoint tensor.
    `rows` given to `source` (a checkpoint row order over the whole tensor: MLA's rope de-interleave) is cut to
    this rank's rows, so it still reads only them (engine/rank/loader._read reads a contiguous range of rows)."""

    name = "column"

    def __init__(self, row_starts: tuple[int, ...], widths: tuple[int, ...]):
        self.row_starts, self.widths = tuple(row_starts), tuple(widths)

    def source(self, piece: int, rows: tuple) -> tuple:
        a, n = self.row_starts[piece], self.widths[piece]
        if rows:
            return (rows[0][a:a + n],)
        return (slice(a, a + n),)

    def scale_source(self, piece: int, block: tuple[int, int]) -> tuple:
        a, n = self.row_starts[piece], self.widths[piece]
        return (slice(a // block[0], -(-(a + n) // block[0])),)

    def finish(self, y_TN: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        return y_TN if bias_N is None else y_TN + bias_N


class OwnRows:
    """The rows the layer's weight plan names for this rank (its heads' rows, already cut), read as given; the
    output is the rank's share, as ColumnParallel's. Float weights only: the rows need not fall on FP8 blocks."""

    name = "own_rows"

    def source(self, piece: int, rows: tuple) -> tuple:
        if not rows:
            raise ValueError("an OwnRows linear reads the rows its layer names: the plan gave none.")
        return rows

    def scale_source(self, piece: int, block: tuple[int, int]) -> tuple:
        raise ValueError("an OwnRows linear is float only: it has no FP8 block scales to read.")

    def finish(self, y_TN: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        return y_TN if bias_N is None else y_TN + bias_N


class RowParallel:
    """Input columns [col_start, col_start + in_features) of the checkpoint tensor; the output summed over `tp`."""

    name = "row"

    def __init__(self, tp: TensorParallel, col_start: int, in_features: int, reduce: bool = True):
        """reduce False: the caller sums the partial output with others' first and all-reduces once (a MoE block
        whose routed and shared experts are both split by TP)."""
        self.tp, self.col_start, self.in_features, self.reduce = tp, col_start, in_features, reduce

    def source(self, piece: int, rows: tuple) -> tuple:
        if rows:
            raise ValueError("a row-parallel linear reads its rows as stored: no row order.")
        return (slice(None), slice(self.col_start, self.col_start + self.in_features))

    def scale_source(self, piece: int, block: tuple[int, int]) -> tuple:
        a, b = self.col_start, self.col_start + self.in_features
        return (slice(None), slice(a // block[1], -(-b // block[1])))

    def finish(self, y_TN: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        if not self.reduce:
            if bias_N is not None:
                raise ValueError("a row-parallel linear left unreduced cannot add its bias (it would be added N times).")
            return y_TN
        y_TN = self.tp.all_reduce(y_TN)
        return y_TN if bias_N is None else y_TN + bias_N


__all__ = ["ColumnParallel", "LinearParallel", "OwnRows", "Replicated", "RowParallel"]
