"""CUDA graphs of the model's forward pass for pure-decode steps, one graph per padded batch size.

Why: a decode step of a 48-layer MoE model launches ~800 kernels; from
Python each launch costs 10–40 µs of host time, which at small batches is
several times the step's memory floor. A replayed graph launches them all at
once. Prefill and mixed steps stay eager (their shapes vary every step).

How (the vLLM recipe): the forward reads its inputs from static device buffers
sized for the largest captured batch; a step of n sequences picks the smallest
captured size b >= n, copies its inputs into the first n rows, fills rows
n..b with padding that touches nothing, replays graph b and reads rows 0..n
of its static output. Padding rows: token 0 at position 0, KV slot -1 (the KV
write skips it), one cached token in the never-allocated zero null block, so
attention over them is finite and no real block is read or written; their MoE
rows run (wasted work, as in vLLM) but are masked out of the expert counters.

Only the Triton kernels are captured: they read lengths from device tensors.
The metadata's host lists are fixed at capture (query_lens = 1s; seq_lens =
max_model_len, an upper bound that only picks the decode split count, since
each split's range comes from the device's seq_lens). The reference kernels
read the host lists, so they cannot be captured.

Legend: B largest captured batch, b captured batch, n sequences this step,
M max blocks per sequence, D hidden.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata

from .models.layers import ForwardContext

logger = logging.getLogger(__name__)

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
        """The engine's choice: off on CPU or with enforce_eager; the given sizes, else the defaults."""
        if sizes is not None:
            cfg = cls(tuple(sizes))  # validates before anything is dropped
            too_big = [s for s in cfg.batch_sizes if s > max_num_seqs]
            if too_big:
                raise ValueError(f"cuda_graph_sizes contains {too_big[0]}, above max_num_seqs={max_num_seqs}: "
                                 "a decode batch is never that large; give sizes <= max_num_seqs.")
        if enforce_eager or device.type != "cuda":
            return cls(())
        return cls(tuple(sizes)) if sizes is not None else cls(default_graph_sizes(max_num_seqs))


# -- capture backends: one strategy object per way of "replaying" ----------------------------------------------
class CapturedStep:
    """A captured forward: `replay()` runs it on the current static inputs and returns its output."""

    def __init__(self, replay: Callable[[], torch.Tensor]):
        self.replay = replay


class CudaGraphCapture:
    """torch.cuda.CUDAGraph, all graphs sharing one memory pool (only one replays at a time, and its
    output is read before the next replay)."""

    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return CapturedStep(replay)


class EagerReplay:
    """Stand-in for CPU tests: `replay` calls the forward again on the same static buffers, so
    everything but the capture itself (padding, static metadata, masking) is exercised."""

    name = "eager-replay"

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        fn()
        return CapturedStep(fn)


class DecodeGraphs:
    """Static decode inputs, one captured forward per batch size, and the copy-in/replay of a step."""

    def __init__(self, model, kv_caches, sizes: tuple[int, ...], max_blocks_per_seq: int, max_model_len: int,
                 null_block: int, device: torch.device, backend):
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size.")
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = tuple(sorted(sizes))
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.null_block = null_block
        B, M = self.max_batch, max_blocks_per_seq
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        self.input_ids_B = torch.zeros(B, **i64)
        self.positions_B = torch.zeros(B, **i64)
        self.slots_B = torch.full((B,), -1, **i64)
        self.seq_lens_B = torch.ones(B, **i32)
        self.tables_BM = torch.full((B, M), null_block, **i32)
        self.qsl_B1 = torch.arange(B + 1, **i32)  # one query token per sequence, always
        self.row_weight_B = torch.zeros(B, **i64)  # 1 for real rows: the expert counters skip padding
        self.steps: dict[int, CapturedStep] = {}
        # Host staging, padded once: a step overwrites the first n rows and re-pads the tail.
        self._host = dict(ids=np.zeros(B, np.int64), pos=np.zeros(B, np.int64), slots=np.full(B, -1, np.int64),
                          lens=np.ones(B, np.int32), tables=np.full((B, M), null_block, np.int32),
                          weight=np.zeros(B, np.int64))

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_start_loc_S1=self.qsl_B1[: b + 1], seq_lens_S=self.seq_lens_B[:b], block_tables_SM=self.tables_BM[:b],
            slot_mapping_T=self.slots_B[:b], query_lens=[1] * b, seq_lens=[self.max_model_len] * b,
            max_query_len=1, max_seq_len=self.max_model_len, null_block=self.null_block,
        )
        stats = self.model.moe_stats
        stats.row_weight_T = self.row_weight_B[:b]
        try:
            return self.model(self.input_ids_B[:b], self.positions_B[:b], ForwardContext(meta, self.kv_caches))
        finally:
            stats.row_weight_T = None

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (later, smaller graphs reuse the pool's blocks). The static
        inputs hold padding throughout, so warm-up runs write no KV and count no experts."""
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up outside capture: Triton compiles, the allocator settles
            self.steps[b] = self.backend.capture(lambda b=b: self._forward(b))
        self.model.moe_stats.reset()
        logger.info("captured %d decode graphs (%s) for batch sizes %s", len(self.sizes), self.backend.name,
                    ", ".join(map(str, self.sizes)))

    def size_for(self, n: int) -> int | None:
        """The smallest captured size holding n sequences; None if n is above the largest."""
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def run(self, input_ids: list[int], positions_T: np.ndarray, slots_T: np.ndarray, seq_lens: list[int],
            tables_SM: np.ndarray) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences (n <= max_batch): hidden states [n, D]."""
        n = len(input_ids)
        b = self.size_for(n)
        h = self._host
        m = tables_SM.shape[1]
        h["ids"][:n], h["pos"][:n], h["slots"][:n], h["lens"][:n] = input_ids, positions_T, slots_T, seq_lens
        h["tables"][:n, :m] = tables_SM
        h["tables"][:n, m:] = self.null_block
        h["weight"][:n] = 1
        # Rows n..b: padding again (an earlier, larger step may have left real values there).
        h["ids"][n:b], h["pos"][n:b], h["slots"][n:b], h["lens"][n:b], h["weight"][n:b] = 0, 0, -1, 1, 0
        h["tables"][n:b] = self.null_block
        for dst, src in ((self.input_ids_B, h["ids"]), (self.positions_B, h["pos"]), (self.slots_B, h["slots"]),
                         (self.seq_lens_B, h["lens"]), (self.row_weight_B, h["weight"])):
            dst[:b].copy_(torch.from_numpy(src[:b]), non_blocking=False)
        self.tables_BM[:b].copy_(torch.from_numpy(h["tables"][:b]))
        return self.steps[b].replay()[:n]
