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
they cannot be captured. Batch-invariant mode's Triton backend is captured too, for
the models it covers (graph_policy.py), with one difference: its attention sizes its
grid of fixed key splits by the host max_seq_len, so its decode graphs are captured
with the host lengths at their bound, max_model_len (`bound_host_lengths`), as verify
graphs are; a row's splits past its own length return at once. The runner captures
inside the backend's step context, so the graphs hold the mode's own kernels.

Speculative verify steps (`verify_len` = Q = 1 + k tokens per row): beside each decode graph b, a verify graph b of
b x Q tokens, replayed for every step whose rows each have 1 to Q query tokens (verify rows of however many
drafts the scheduler granted: its draft control gives each request its own length, and an n-gram lookup often
finds fewer than k; decode rows among them). A row of q < Q tokens is padded at its front: Q - q padding tokens
at the positions before its first real one (already cached: the padding reads real keys, writes no KV, routes to
no expert) and its real tokens last, so that the kernels' rule, token i of a row sees keys up to seq_len - Q + i,
gives each real token exactly its eager context. Hence seq_len >= Q for every row (a padding token sees at least
one key); a step with a shorter row runs eagerly. The real tokens' outputs are gathered back in the eager order
(`rows_T`), and so are the indices of tokens still on the device (`pending_P`). The same padding
(rows n..b: 1 + k padding tokens each, seq_len 1 + k over the null block), and the same rule: the kernels read
every length from the device. Their multi-token path (the prefill kernels) plans its key splits from the host
lengths at capture, so the verify graphs are captured with the host lengths at their bound, max_model_len: a
replay over a short context leaves most splits empty, never walks a long one with too few programs. An fp8 MLA
cache widens a multi-token step's context with host lengths (kernels/triton_mla_wide.py): no verify graphs there.

A feature's per-token input (`token_input`, engine/contract/step_plugin.GraphTokenInput; LoRA adapters,
engine/lora/): each token's adapter slot is one more static input (padding rows and rows of
no adapter -1: the shrink / expand kernels skip them), as vLLM captures its LoRA decode graphs with the per-row
adapter index an input. The captured forward runs every targeted piece's shrink / expand whatever the slots then
held (a piece no slot's adapter targets holds zeros and adds 0), and the adapters' A / B / scales are fixed device
slots written in place, so an adapter loaded into a slot after the capture is what the next replay reads: nothing is
re-captured. A step without adapters replays the same graphs (its LoRA kernels see only -1 rows). With the Triton
kernels the captured forward runs the routed experts' LoRA path too (kernels/triton_lora_moe.py: no host loop), so a
step whose rows' adapters target routed experts replays as well; with the plain-torch path (its loop over experts
syncs on the host) such a step runs eagerly (engine/lora/rank/plugin.py `LoRAStepPlan.graphable`).

Memory: graphs are captured after the KV cache took its share of
gpu_memory_utilization, so they (a shared pool of tens of MB for decode
activations plus the graphs themselves; logged after capture) live in the
remaining headroom, like eager prefill activations.

Legend: B largest captured batch, b captured batch, n sequences this step, q query tokens per row (1, or
verify_len), T = b x q tokens, M max blocks per sequence, D hidden.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata

from ..contract.step_plugin import GraphTokenInput
from ..models.layers import ForwardContext
from ..state.step import StateStep

logger = logging.getLogger(__name__)


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
    """Static step inputs, one captured forward per batch size (and per verify size, with `verify_len` > 1), and
    the copy-in/replay of a step."""

    def __init__(self, model, kv_caches, sizes: tuple[int, ...], max_blocks_per_seq: int, null_block: int,
                 device: torch.device, backend, sliding_table: bool = False, verify_len: int = 1,
                 max_context: int = 1, verify_batch_sizes: tuple[int, ...] | None = None, state_slots: bool = False,
                 bound_host_lengths: bool = False, token_input: GraphTokenInput | None = None):
        """`sliding_table`: the sliding-window layers have their own block table (a second static table and
        slot buffer, read by those layers through ForwardContext.attn_sliding). `verify_len`: query tokens per
        row of a speculative verify step (1 + k) to capture beside the decode graphs (1: none); `max_context`:
        the longest context a row can have (max_model_len), the host bound the verify graphs are captured with
        (module docstring); `verify_batch_sizes`: the batch sizes of those (default: every decode size).
        `state_slots`: the model has linear-attention layers: each row's state slot is a static input too (padding
        rows -1: their states read as zeros, written nowhere), read through ForwardContext.state.
        `bound_host_lengths`: the decode graphs' host lengths at max_context too, as the verify graphs' (kernels
        that size a grid by the host max_seq_len: the batch-invariant Triton attention, graph_policy.py).
        `token_input`: a step plug-in's per-token input (LoRA: engine/lora/slots.py `LoRASlots`, each token's adapter
        slot; None: none): a static input too (padding rows -1), read by the captured forward inside
        `token_input.captured`; LoRA's adapters sit in fixed device slots, so a slot loaded after the capture needs
        none again."""
        if state_slots and verify_len > 1:
            raise ValueError("DecodeGraphs: verify graphs of a model with per-sequence state are not built (its verify "
                             "steps split the batch and replay the accepted tokens: they run eagerly).")
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size.")
        if verify_len < 1:
            raise ValueError(f"verify_len={verify_len} is invalid: must be >= 1 (1: no verify graphs).")
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = tuple(sorted(sizes))
        self.max_batch = self.sizes[-1]
        self.null_block = null_block
        self.verify_len, self.max_context = verify_len, max(max_context, verify_len)
        self.bound_host_lengths = bound_host_lengths
        self.verify_sizes = tuple(sorted(self.sizes if verify_batch_sizes is None else verify_batch_sizes))
        if not set(self.verify_sizes) <= set(self.sizes):
            raise ValueError(f"verify_batch_sizes={self.verify_sizes} must be among the decode sizes {self.sizes}.")
        B, M, Q = self.max_batch, max_blocks_per_seq, verify_len
        TB = B * Q  # token rows of the largest graph
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        self.input_ids_T = torch.zeros(TB, **i64)
        self.positions_T = torch.zeros(TB, **i64)
        self.slots_T = torch.full((TB,), -1, **i64)
        self.valid_T = torch.zeros(TB, dtype=torch.bool, device=device)  # real rows; padding routes to no expert
        self.seq_lens_B = torch.ones(B, **i32)
        self.tables_BM = torch.full((B, M), null_block, **i32)
        # Query starts: one token per sequence (decode), Q per sequence (verify); fixed, so never copied.
        self.qsl_B1 = {1: torch.arange(B + 1, **i32)}
        if Q > 1:
            self.qsl_B1[Q] = torch.arange(B + 1, **i32) * Q
        # A ragged verify step: where each real token sits among the graph's b x Q rows, in the eager order.
        self.rows_T = torch.zeros(TB, **i64)
        self.sliding_table = sliding_table
        self.state_slots = state_slots
        if state_slots:
            self.state_slots_B = torch.full((B,), -1, **i32)
            self.continues_B = torch.ones(B, dtype=torch.bool, device=device)  # decode rows continue their state
        if sliding_table:
            self.sliding_slots_T = torch.full((TB,), -1, **i64)
            self.sliding_tables_BM = torch.full((B, M), null_block, **i32)
        self.token_input = token_input
        if token_input is not None:
            self.token_values_T = torch.full((TB,), -1, **i64)
        self.steps: dict[int, CapturedStep] = {}  # decode graphs, by batch size
        self.verify_steps: dict[int, CapturedStep] = {}  # verify graphs (Q tokens per row), by batch size
        # Host staging, pinned on CUDA so the copies are asynchronous; two sets, used in turn. The overlapped
        # loop stages step N+1 while step N's copies may still be queued on the device; the runner keeps at
        # most two steps in flight (it waits for the older one's device work before staging a third), so the
        # set a step stages into was last read by a step the device has finished.
        pin = device.type == "cuda"

        def host(shape, dtype, fill):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pin).numpy()

        def staging() -> dict:
            h = dict(ids=host((TB,), torch.long, 0), pos=host((TB,), torch.long, 0),
                     slots=host((TB,), torch.long, -1), lens=host((B,), torch.int32, 1),
                     tables=host((B, M), torch.int32, null_block), valid=host((TB,), torch.bool, False),
                     rows=host((TB,), torch.long, 0))
            if sliding_table:
                h.update(sliding_slots=host((TB,), torch.long, -1),
                         sliding_tables=host((B, M), torch.int32, null_block))
            if state_slots:
                h.update(state_slots=host((B,), torch.int32, -1))
            if token_input is not None:
                h.update(token_values=host((TB,), torch.long, -1))
            return h

        self._staging = [staging(), staging()]
        self._staging_t = [{k: torch.from_numpy(v) for k, v in h.items()} for h in self._staging]
        self._num_staged = 0

    def _forward(self, b: int, q: int = 1) -> torch.Tensor:
        T = b * q
        # Host lengths as captured (module docstring): decode's are the static padding (its kernels read the
        # device's); a verify graph's are their bound, so the multi-token kernels plan their splits for it, and so
        # are a decode graph's with `bound_host_lengths` (the batch-invariant attention's split grid).
        host_len = 1 if q == 1 and not self.bound_host_lengths else self.max_context
        meta = AttentionMetadata(
            query_start_loc_S1=self.qsl_B1[q][: b + 1], seq_lens_S=self.seq_lens_B[:b],
            block_tables_SM=self.tables_BM[:b], slot_mapping_T=self.slots_T[:T], query_lens=[q] * b,
            seq_lens=[host_len] * b, max_query_len=q, max_seq_len=host_len, null_block=self.null_block,
        )
        meta_sliding = None
        if self.sliding_table:
            meta_sliding = dataclasses.replace(meta, block_tables_SM=self.sliding_tables_BM[:b],
                                               slot_mapping_T=self.sliding_slots_T[:T])
        state = None
        if self.state_slots:
            state = StateStep(self.state_slots_B[:b], self.continues_B[:b], self.qsl_B1[q][: b + 1], True)
        self.model.set_valid_rows(self.valid_T[:T])
        self.model.begin_routing_capture()  # the graph's routed-id copies write rows 0 .. T (moe/routing_capture.py)
        extra = (self.token_input.captured(self.token_values_T[:T]) if self.token_input is not None
                 else contextlib.nullcontext())
        try:
            with extra:
                return self.model(self.input_ids_T[:T], self.positions_T[:T],
                                  ForwardContext(meta, self.kv_caches, meta_sliding, state=state))
        finally:
            self.model.set_valid_rows(None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (later, smaller graphs reuse the pool's blocks), and replay
        each once, so a graph that cannot run fails here (and is dropped) rather than in a user's step.
        The static inputs hold padding throughout: warm-ups and test replays write no KV and count no
        experts. A size that fails is skipped; a failure that is not out-of-memory (a host sync in the
        forward, say) would fail every size, so it stops the capture (of the verify graphs alone, when only
        a verify graph failed: decode graphs are the ones every step without drafts replays)."""
        before = self.backend.memory_in_use()
        with self.backend.device_guard():
            self._capture_kind(self.steps, 1, "decode", self.sizes)
            if self.verify_len > 1 and self.steps:
                self._capture_kind(self.verify_steps, self.verify_len, "verify",
                                   tuple(b for b in self.verify_sizes if b in self.steps))
            used = self.backend.memory_in_use() - before
        self.model.moe_stats.reset()
        self.sizes = tuple(sorted(self.steps))
        self.max_batch = self.sizes[-1] if self.sizes else 0
        logger.info("captured %d decode graphs (%s) for batch sizes %s%s; %.0f MiB of device memory", len(self.sizes),
                    self.backend.name, ", ".join(map(str, self.sizes)) or "none",
                    f", {len(self.verify_steps)} verify graphs of {self.verify_len} tokens per row for "
                    f"{', '.join(map(str, sorted(self.verify_steps))) or 'none'}" if self.verify_len > 1 else "",
                    used / 2**20)

    def _capture_kind(self, steps: dict[int, CapturedStep], q: int, kind: str, sizes: tuple[int, ...]) -> None:
        for b in reversed(sizes):
            try:
                self._forward(b, q)  # warm-up outside capture: Triton compiles, the allocator settles
                step = self.backend.capture(lambda b=b, q=q: self._forward(b, q))
                step.replay()
            except RuntimeError as e:
                oom = "out of memory" in str(e).lower()
                logger.warning("CUDA graph for %s batch %d not captured (%s)%s", kind, b, str(e).splitlines()[0][:300],
                               "" if oom else f"; {kind} steps run eagerly at every size")
                if not oom:
                    steps.clear()
                    return
                continue
            steps[b] = step

    def size_for(self, n: int, q: int = 1) -> int | None:
        """The smallest captured size holding n sequences of q query tokens each; None if there is none."""
        steps = self.steps if q == 1 else self.verify_steps if q == self.verify_len else {}
        for b in sorted(steps):
            if b >= n:
                return b
        return None

    def run(self, input_ids, positions_T: np.ndarray, slots_T: np.ndarray, seq_lens: list[int],
            tables_SM: np.ndarray, sliding: tuple[np.ndarray, np.ndarray] | None = None,
            batch: int | None = None, state_slots: list[int] | None = None,
            query_lens: list[int] | None = None, token_values: np.ndarray | None = None) -> torch.Tensor:
        """One step of n = len(seq_lens) sequences (n <= max_batch): hidden states [len(input_ids), D] in the
        eager order. `stage` then `replay` (the runner calls them apart: the host stages while the device runs
        the step before)."""
        return self.replay(self.stage(input_ids, positions_T, slots_T, seq_lens, tables_SM, sliding, batch,
                                      state_slots, query_lens, token_values))

    def verify_fits(self, query_lens: list[int], seq_lens: list[int]) -> bool:
        """Whether a step of these rows can replay a verify graph (module docstring): each row 1 to Q tokens,
        some row more than one, and every row's context at least Q (its padding tokens see a key each)."""
        Q = self.verify_len
        return (Q > 1 and bool(query_lens) and max(query_lens) > 1 and all(1 <= q <= Q for q in query_lens)
                and min(seq_lens) >= Q)

    def stage(self, input_ids, positions_T: np.ndarray, slots_T: np.ndarray, seq_lens: list[int],
              tables_SM: np.ndarray, sliding: tuple[np.ndarray, np.ndarray] | None = None,
              batch: int | None = None, state_slots: list[int] | None = None,
              query_lens: list[int] | None = None, token_values: np.ndarray | None = None) -> tuple:
        """Host work of a step: its inputs written into the next pinned staging set (rows n..b padding). The
        flat token inputs hold each sequence's tokens in order: 1 each (decode), or `query_lens` (1 to
        verify_len each, some more than 1: a verify graph, rows shorter than verify_len padded at the front;
        None: len(input_ids) / n each). `sliding`: the sliding group's (tables [n, m'], slots [t]) when it has
        its own table. `batch`: the captured size to replay (>= n; expert parallelism: the size the driver chose
        for every rank); default the smallest holding n. `token_values`: each token's value of `token_input` [t]
        (None: -1 for every row: LoRA, no row has an adapter). Returns what `replay` needs."""
        n = len(seq_lens)
        t = len(input_ids)
        if query_lens is None:
            q = t // n if n else 0
            if q < 1 or q * n != t or q not in self.qsl_B1:
                raise ValueError(f"a graph step of {n} sequences and {t} tokens is invalid: each sequence must "
                                 f"have 1 or {self.verify_len} query tokens.")
            query_lens = [q] * n
        elif len(query_lens) != n or sum(query_lens) != t:
            raise ValueError(f"query_lens {list(query_lens)} do not describe {n} sequences of {t} tokens in all.")
        q = 1 if max(query_lens, default=1) == 1 else self.verify_len
        if q > 1 and not self.verify_fits(query_lens, seq_lens):
            raise ValueError(f"a verify graph holds rows of 1 to {self.verify_len} query tokens over contexts of at "
                             f"least {self.verify_len} (verify_fits): got {list(query_lens)} over {list(seq_lens)}.")
        b = self.size_for(n, q) if batch is None else batch
        steps = self.steps if q == 1 else self.verify_steps
        if b not in steps or b < n:
            raise ValueError(f"graph batch {b} is invalid for {n} sequences of {q} tokens: captured sizes are "
                             f"{tuple(sorted(steps))}.")
        k = self._num_staged % 2
        self._num_staged += 1
        h = self._staging[k]
        m = tables_SM.shape[1]
        nq, T = n * q, b * q
        ragged = t != nq
        if ragged:  # each row's real tokens last among its q (module docstring); padding before them
            ql = np.asarray(query_lens, dtype=np.int64)
            starts = np.cumsum(ql) - ql
            dst = np.repeat(np.arange(n) * q + q - ql - starts, ql) + np.arange(t)
            lens = np.asarray(seq_lens, dtype=np.int64)
            h["ids"][:nq], h["slots"][:nq], h["valid"][:nq] = 0, -1, False
            h["pos"][:nq] = np.repeat(lens - q, q) + np.tile(np.arange(q), n)
            h["ids"][dst], h["pos"][dst], h["slots"][dst], h["valid"][dst] = input_ids, positions_T, slots_T, True
            h["rows"][:t] = dst
        else:
            h["ids"][:t], h["pos"][:t], h["slots"][:t] = input_ids, positions_T, slots_T
            h["valid"][:t] = True
        h["lens"][:n] = seq_lens
        h["tables"][:n, :m] = tables_SM
        # Rows n..b: padding again (an earlier, larger step may have left real values there): q tokens at
        # positions 0..q-1 of a row whose q keys all sit in the null block.
        h["ids"][nq:T], h["slots"][nq:T], h["lens"][n:b], h["valid"][nq:T] = 0, -1, q, False
        h["pos"][nq:T] = np.tile(np.arange(q), b - n)
        h["tables"][n:b, :m] = self.null_block
        ms = 0
        if self.sliding_table:
            # Not append-only (freed entries turn null), but every column a row reads is rewritten here.
            s_tables, s_slots = sliding  # type: ignore[misc]  # sliding_table: the step has its (tables, slots)
            ms = s_tables.shape[1]
            h["sliding_tables"][:n, :ms] = s_tables
            if ragged:
                h["sliding_slots"][:nq] = -1
                h["sliding_slots"][dst] = s_slots
            else:
                h["sliding_slots"][:t] = s_slots
            h["sliding_tables"][n:b, :ms], h["sliding_slots"][nq:T] = self.null_block, -1
        if self.state_slots:
            if state_slots is None or len(state_slots) != n:
                raise ValueError(f"a graph step of a model with per-sequence state needs each of its {n} sequences' "
                                 "state slot (state_slots).")
            h["state_slots"][:n], h["state_slots"][n:b] = state_slots, -1
        if self.token_input is not None:  # each real token's value (LoRA: its slot); padding (and no adapter) -1
            h["token_values"][:T] = -1
            if token_values is not None:
                h["token_values"][dst if ragged else slice(0, t)] = token_values
        return k, n, b, q, m, ms, t if ragged else None

    def replay(self, staged: tuple, pending_P: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Device work of a step: the staged inputs copied in (non-blocking), the tokens still on the device
        scattered in (`pending_P`: flat token rows [P] in the eager order, token ids [P]), graph b (of q tokens
        per row) replayed; hidden states [t, D] of the step's real tokens, in the eager order."""
        k, n, b, q, m, ms, ragged_t = staged
        t = self._staging_t[k]
        T = b * q
        for dst, key, rows in ((self.input_ids_T, "ids", T), (self.positions_T, "pos", T), (self.slots_T, "slots", T),
                               (self.seq_lens_B, "lens", b), (self.valid_T, "valid", T)):
            dst[:rows].copy_(t[key][:rows], non_blocking=True)
        if ragged_t is not None:
            self.rows_T[:ragged_t].copy_(t["rows"][:ragged_t], non_blocking=True)
        if pending_P is not None:
            at = pending_P[0] if ragged_t is None else self.rows_T.index_select(0, pending_P[0])
            self.input_ids_T.index_copy_(0, at, pending_P[1])
        # Only the first m columns: a row reads columns < ceil(seq_len / block) <= m, and a padding row
        # (seq_len q <= block) reads column 0. Older columns past m are never read.
        self.tables_BM[:b, :m].copy_(t["tables"][:b, :m], non_blocking=True)
        if self.sliding_table:
            self.sliding_slots_T[:T].copy_(t["sliding_slots"][:T], non_blocking=True)
            self.sliding_tables_BM[:b, :ms].copy_(t["sliding_tables"][:b, :ms], non_blocking=True)
        if self.state_slots:
            self.state_slots_B[:b].copy_(t["state_slots"][:b], non_blocking=True)
        if self.token_input is not None:
            self.token_values_T[:T].copy_(t["token_values"][:T], non_blocking=True)
        steps = self.steps if q == 1 else self.verify_steps
        out_TD = steps[b].replay()
        if ragged_t is not None:
            return out_TD.index_select(0, self.rows_T[:ragged_t])
        return out_TD[: n * q]
