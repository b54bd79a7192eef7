"""What a model runner keeps of each request between steps: its tokens, block tables, generator, and where its
token still on the device is (the overlapped loop).

Legend: M blocks per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from moelink.scheduler.sliding_kv import NULL_BLOCK

from ..contract.sampling_params import SamplingParams

if TYPE_CHECKING:
    from .input_batch import PersistentBatch


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    all_token_ids: list[int] = field(init=False)
    # block_ids as an int32 array with spare capacity: each step copies it into the batch's table
    # with one slice assignment instead of converting a Python list.
    block_arr: np.ndarray = field(init=False)
    # The sliding-window group's table when it has its own (scheduler/sliding_kv.py), the runner's null block
    # where no query can see a block any more; None when one table serves every layer.
    sliding: "SlidingTable | None" = None
    # Overlapped loop: (the step in flight that sampled this request's next token, its row there). The host
    # learns the token when that step is collected; a step launched before then reads it on the device.
    pending: "tuple[object, int] | None" = None
    # The runner's persistent batch row (engine/rank/input_batch.py) while it holds the request: block_arr is then a
    # view of that row of the batch's block table.
    row: int | None = None
    batch: "PersistentBatch | None" = None
    # The request's per-sequence state slot (linear attention: engine/state/cache.py); -1: the model has none.
    state_slot: int = -1

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.block_arr = np.empty(max(16, 2 * len(self.block_ids)), dtype=np.int32)
        self.block_arr[: len(self.block_ids)] = self.block_ids

    def add_blocks(self, new_block_ids: list[int]) -> None:
        if self.batch is not None:
            self.batch.add_blocks(self, new_block_ids)
            self.block_ids.extend(new_block_ids)
            return
        n, k = len(self.block_ids), len(new_block_ids)
        if n + k > len(self.block_arr):
            grown = np.empty(2 * (n + k), dtype=np.int32)
            grown[:n] = self.block_arr[:n]
            self.block_arr = grown
        self.block_arr[n : n + k] = new_block_ids
        self.block_ids.extend(new_block_ids)


class SlidingTable:
    """One request's sliding-group block table. Not append-only: entries that leave the window turn into the
    null block, by the scheduler's rule (first_live_sliding_block), so a freed id (maybe another request's
    block by now) is never even addressed."""

    def __init__(self, block_ids: list[int], null_block: int) -> None:
        self.arr = np.empty(max(16, 2 * len(block_ids)), dtype=np.int32)
        self.n = len(block_ids)
        self.arr[: self.n] = [null_block if b == NULL_BLOCK else b for b in block_ids]
        self.num_nulled = 0

    def add(self, new_block_ids: list[int]) -> None:
        n, k = self.n, len(new_block_ids)
        if n + k > len(self.arr):
            grown = np.empty(2 * (n + k), dtype=np.int32)
            grown[:n] = self.arr[:n]
            self.arr = grown
        self.arr[n : n + k] = new_block_ids
        self.n = n + k

    def drop_before(self, first_live: int, null_block: int) -> None:
        stop = min(first_live, self.n)
        if stop > self.num_nulled:
            self.arr[self.num_nulled : stop] = null_block
            self.num_nulled = stop
