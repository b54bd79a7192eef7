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
attention over them is finite and no real block is read or written; the MoE
layers route them to no expert (id -1), so they add no expert weight reads
(a padding row past an expert's block boundary would re-stream its weights)
and no expert load.

Only the Triton kernels are captured: they read lengths from device tensors.
The metadata's host lists are fixed at capture and describe the static buffers
as captured (query_lens = 1s, seq_lens = 1s: every row padding); no captured
kernel reads a host length. The decode split plan is the device's
(kernels/triton_split_plan.py): how many work programs a graph launches comes
from its batch size, the heads and the SM count only, and how they are shared
among the sequences is computed on the device from each replay's seq_lens. So
a replay of b sequences runs the plan an eager step of b decodes runs, bit for
bit, whatever max_model_len is. The reference kernels read the host lists, so
they cannot be captured.

Memory: graphs are captured after the KV cache took its share of
gpu_memory_utilization, so they (a shared pool of tens of MB for decode
activations plus the graphs themselves; logged after capture) live in the
remaining headroom, like eager prefill activations.

Legend: B largest captured batch, b captured batch, n sequences this step,
M max blocks per sequence, D hidden.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata

from ..models.layers import ForwardContext

logger = logging.getLogger(__name__)


# -- capture backends: one strategy object per way of "replaying" ----------------------------------------------

def graph_sizes_to_capture(sizes: tuple[int, ...], kernels, ep, two_batch_overlap: bool, backend,
                           device: torch.device, quantized: bool, log: logging.Logger = logger) -> tuple[int, ...]:
    """The decode batch sizes a runner captures of the `sizes` asked: none when its kernels, step plan,
    all-to-all, device or quantization rule graphs out (logged on `log`, with why); under EP only those within
    the low-latency decode capacity."""
    if not sizes:
        return ()
    why_not = None
    if kernels.name != "triton":
        why_not = f"the {kernels.name} kernels read host-side lengths, which a graph would freeze"
    elif ep is not None and two_batch_overlap:
        why_not = ("two-batch overlap runs every step as two micro-batches (two dispatches per MoE layer) and a "
                   "decode graph captures one: all ranks must make the same collective calls")
    elif ep is not None and ep.all_to_all.low_latency is None:
        why_not = (f"the {ep.all_to_all.name} all-to-all sizes its buffers from counts on the host; decode graphs "
                   "under expert parallelism need a fixed-capacity backend's low-latency mode (nccl)")
    elif ep is not None and backend is None and ep.all_to_all.name != "nccl":
        # A capture that fails on one rank mid-collective would leave its peers waiting: only the transport
        # captured in tests (direct NCCL) is captured under EP (the CPU stand-in replays any).
        why_not = f"under expert parallelism only the nccl all-to-all is captured, not {ep.all_to_all.name}"
    elif backend is None and device.type != "cuda":
        why_not = f"device {device} is not a CUDA device"
    elif quantized and not all(hasattr(kernels, op) for op in ("fp8_linear", "fused_moe_fp8")):
        # Until its Triton kernels exist, FP8 runs the references, whose MoE loops over experts on the host.
        why_not = f"the {kernels.name} kernels have no FP8 GEMMs yet (the references run, with host syncs)"
    if why_not:
        log.info("CUDA graphs off: %s.", why_not)
        return ()
    if ep is not None:
        # A graph replays the low-latency dispatch, whose blocks hold at most the decode capacity.
        cap = ep.all_to_all.decode_capacity
        if any(s > cap for s in sizes):
            log.info("decode graphs above the EP decode capacity %d dropped (those steps run eagerly).", cap)
        sizes = tuple(s for s in sizes if s <= cap)
    return tuple(sizes)


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
        # thread_local: an unrelated thread's CUDA call (an allocator free, a copy) must not void this capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return CapturedStep(replay)

    def device_guard(self):
        return torch.cuda.device(self.device)

    def memory_in_use(self) -> int:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free


class EagerReplay:
    """Stand-in for CPU tests: `replay` calls the forward again on the same static buffers, so
    everything but the capture itself (padding, static metadata, masking) is exercised."""

    name = "eager-replay"

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        fn()
        return CapturedStep(fn)

    def device_guard(self):
        return contextlib.nullcontext()

    def memory_in_use(self) -> int:
        return 0


class DecodeGraphs:
    """Static decode inputs, one captured forward per batch size, and the copy-in/replay of a step."""

    def __init__(self, model, kv_caches, sizes: tuple[int, ...], max_blocks_per_seq: int, null_block: int,
                 device: torch.device, backend, sliding_table: bool = False):
        """`sliding_table`: the sliding-window layers have their own block table (a second static table and
        slot buffer, read by those layers through ForwardContext.attn_sliding)."""
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size.")
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = tuple(sorted(sizes))
        self.max_batch = self.sizes[-1]
        self.null_block = null_block
        B, M = self.max_batch, max_blocks_per_seq
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        self.input_ids_B = torch.zeros(B, **i64)
        self.positions_B = torch.zeros(B, **i64)
        self.slots_B = torch.full((B,), -1, **i64)
        self.seq_lens_B = torch.ones(B, **i32)
        self.tables_BM = torch.full((B, M), null_block, **i32)
        self.qsl_B1 = torch.arange(B + 1, **i32)  # one query token per sequence, always
        self.valid_B = torch.zeros(B, dtype=torch.bool, device=device)  # real rows; padding routes to no expert
        self.sliding_table = sliding_table
        if sliding_table:
            self.sliding_slots_B = torch.full((B,), -1, **i64)
            self.sliding_tables_BM = torch.full((B, M), null_block, **i32)
        self.steps: dict[int, CapturedStep] = {}
        # Host staging, pinned on CUDA so the copies are asynchronous; two sets, used in turn. The overlapped
        # loop stages step N+1 while step N's copies may still be queued on the device; the runner keeps at
        # most two steps in flight (it waits for the older one's device work before staging a third), so the
        # set a step stages into was last read by a step the device has finished.
        pin = device.type == "cuda"

        def host(shape, dtype, fill):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pin).numpy()

        def staging() -> dict:
            h = dict(ids=host((B,), torch.long, 0), pos=host((B,), torch.long, 0),
                     slots=host((B,), torch.long, -1), lens=host((B,), torch.int32, 1),
                     tables=host((B, M), torch.int32, null_block), valid=host((B,), torch.bool, False))
            if sliding_table:
                h.update(sliding_slots=host((B,), torch.long, -1), sliding_tables=host((B, M), torch.int32, null_block))
            return h

        self._staging = [staging(), staging()]
        self._staging_t = [{k: torch.from_numpy(v) for k, v in h.items()} for h in self._staging]
        self._num_staged = 0

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_start_loc_S1=self.qsl_B1[: b + 1], seq_lens_S=self.seq_lens_B[:b], block_tables_SM=self.tables_BM[:b],
            slot_mapping_T=self.slots_B[:b], query_lens=[1] * b, seq_lens=[1] * b,
            max_query_len=1, max_seq_len=1, null_block=self.null_block,
        )  # host seq_lens: the static buffers' padding at capture; the kernels read the device's (module docstring)
        meta_sliding = None
        if self.sliding_table:
            meta_sliding = dataclasses.replace(meta, block_tables_SM=self.sliding_tables_BM[:b],
                                               slot_mapping_T=self.sliding_slots_B[:b])
        self.model.set_valid_rows(self.valid_B[:b])
        try:
            return self.model(self.input_ids_B[:b], self.positions_B[:b],
                              ForwardContext(meta, self.kv_caches, meta_sliding))
        finally:
            self.model.set_valid_rows(None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (later, smaller graphs reuse the pool's blocks), and replay
        each once, so a graph that cannot run fails here (and is dropped) rather than in a user's step.
        The static inputs hold padding throughout: warm-ups and test replays write no KV and count no
        experts. A size that fails is skipped; a failure that is not out-of-memory (a host sync in the
        forward, say) would fail every size, so it stops the capture."""
        before = self.backend.memory_in_use()
        with self.backend.device_guard():
            for b in reversed(self.sizes):
                try:
                    self._forward(b)  # warm-up outside capture: Triton compiles, the allocator settles
                    step = self.backend.capture(lambda b=b: self._forward(b))
                    step.replay()
                except RuntimeError as e:
                    oom = "out of memory" in str(e).lower()
                    logger.warning("CUDA graph for decode batch %d not captured (%s)%s", b, str(e).splitlines()[0][:300],
                                   "" if oom else "; decoding eagerly at every size")
                    if not oom:
                        self.steps.clear()
                        break
                    continue
                self.steps[b] = step
            used = self.backend.memory_in_use() - before
        self.model.moe_stats.reset()
        self.sizes = tuple(sorted(self.steps))
        self.max_batch = self.sizes[-1] if self.sizes else 0
        logger.info("captured %d decode graphs (%s) for batch sizes %s; %.0f MiB of device memory", len(self.sizes),
                    self.backend.name, ", ".join(map(str, self.sizes)) or "none", used / 2**20)

    def size_for(self, n: int) -> int | None:
        """The smallest captured size holding n sequences; None if n is above the largest."""
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def run(self, input_ids, positions_T: np.ndarray, slots_T: np.ndarray, seq_lens: list[int],
            tables_SM: np.ndarray, sliding: tuple[np.ndarray, np.ndarray] | None = None,
            batch: int | None = None) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences (n <= max_batch): hidden states [n, D]. `stage`
        then `replay` (the runner calls them apart: the host stages while the device runs the step before)."""
        return self.replay(self.stage(input_ids, positions_T, slots_T, seq_lens, tables_SM, sliding, batch))

    def stage(self, input_ids, positions_T: np.ndarray, slots_T: np.ndarray, seq_lens: list[int],
              tables_SM: np.ndarray, sliding: tuple[np.ndarray, np.ndarray] | None = None,
              batch: int | None = None) -> tuple:
        """Host work of a decode step: its inputs written into the next pinned staging set (rows n..b padding).
        `sliding`: the sliding group's (tables [n, m'], slots [n]) when it has its own table. `batch`: the
        captured size to replay (>= n; expert parallelism: the size the driver chose for every rank); default
        the smallest holding n. Returns what `replay` needs."""
        n = len(input_ids)
        b = self.size_for(n) if batch is None else batch
        if b not in self.steps or b < n:
            raise ValueError(f"decode graph batch {b} is invalid for {n} sequences: captured sizes are {self.sizes}.")
        k = self._num_staged % 2
        self._num_staged += 1
        h = self._staging[k]
        m = tables_SM.shape[1]
        h["ids"][:n], h["pos"][:n], h["slots"][:n], h["lens"][:n] = input_ids, positions_T, slots_T, seq_lens
        h["tables"][:n, :m] = tables_SM
        h["valid"][:n] = True
        # Rows n..b: padding again (an earlier, larger step may have left real values there).
        h["ids"][n:b], h["pos"][n:b], h["slots"][n:b], h["lens"][n:b], h["valid"][n:b] = 0, 0, -1, 1, False
        h["tables"][n:b, :m] = self.null_block
        ms = 0
        if self.sliding_table:
            # Not append-only (freed entries turn null), but every column a row reads is rewritten here.
            s_tables, s_slots = sliding
            ms = s_tables.shape[1]
            h["sliding_tables"][:n, :ms], h["sliding_slots"][:n] = s_tables, s_slots
            h["sliding_tables"][n:b, :ms], h["sliding_slots"][n:b] = self.null_block, -1
        return k, n, b, m, ms

    def replay(self, staged: tuple, pending_P: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Device work of a decode step: the staged inputs copied in (non-blocking), the tokens still on the
        device scattered in (`pending_P`: batch rows [P], token ids [P]), graph b replayed; hidden states [n, D]."""
        k, n, b, m, ms = staged
        t = self._staging_t[k]
        for dst, key in ((self.input_ids_B, "ids"), (self.positions_B, "pos"), (self.slots_B, "slots"),
                         (self.seq_lens_B, "lens"), (self.valid_B, "valid")):
            dst[:b].copy_(t[key][:b], non_blocking=True)
        if pending_P is not None:
            self.input_ids_B.index_copy_(0, pending_P[0], pending_P[1])
        # Only the first m columns: a row reads columns < ceil(seq_len / block) <= m, and a padding row
        # (seq_len 1) reads column 0. Older columns past m are never read.
        self.tables_BM[:b, :m].copy_(t["tables"][:b, :m], non_blocking=True)
        if self.sliding_table:
            self.sliding_slots_B[:b].copy_(t["sliding_slots"][:b], non_blocking=True)
            self.sliding_tables_BM[:b, :ms].copy_(t["sliding_tables"][:b, :ms], non_blocking=True)
        return self.steps[b].replay()[:n]
