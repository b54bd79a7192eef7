"""What a model runner keeps of each request between steps (`CachedRequestState`: its tokens, block tables,
generator, and where its token still on the device is), and its persistent batch: one row per request it holds,
kept across steps and updated by what changed.

Legend: R rows (requests held), M block-table columns, V vocabulary, B rows that sample this step.

A step used to rebuild its block tables and sampling tensors from every request's Python lists. Here a request
gets a row when the runner first holds it and keeps it until it finishes or is preempted; its block ids, sampling
parameters and (when it uses penalties) its token counts live in that row, written once or incrementally:

* the block table (int32 [R, M], host memory): `CachedRequestState.block_arr` is a view of the request's row, so
  new blocks land in the table as they arrive; a step gathers its sequences' rows in one indexing op;
* sampling parameters as arrays (temperature, top-k, top-p, min-p, penalties), neutral on greedy rows exactly as
  `SamplingMetadata.build` makes them, plus counts of rows using each feature so an all-greedy batch builds
  nothing;
* logit biases, allowed ids and bad words (engine/rank/logits_rules.py): per request that sets one, a slot on
  the device filled once, as the penalties' are;
* penalties (`PenaltyCounts`): per penalised request, its output-token counts and prompt-seen mask on the device
  (float32 / bool [P, V]), filled once when the row is added and then advanced on the device by every step's
  sampled ids, in stream order: the host never rebuilds a [B, V] tensor from token lists, and tokens still on the
  device (the overlapped loop) are counted without a sync.

Rows are reused (lowest free first); the arrays double when full. Not thread-safe: the runner's host thread owns
it; the device-side counts are only touched in stream order (`PenaltyCounts.record`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moelink.scheduler.sliding_kv import NULL_BLOCK

from ..contract.host_copy import to_device
from ..contract.sampling_params import SamplingParams
from .logits_rules import LogitsRules, RuleFill


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
    sliding: SlidingTable | None = None
    # Overlapped loop: (the step in flight that sampled this request's next token, its row there). The host
    # learns the token when that step is collected; a step launched before then reads it on the device.
    pending: tuple[object, int] | None = None
    # The runner's persistent batch row (PersistentBatch, below) while it holds the request: block_arr is then a
    # view of that row of the batch's block table.
    row: int | None = None
    batch: PersistentBatch | None = None
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


class PenaltyCounts:
    """Device-side token statistics of the penalised requests: one slot per request with a repetition, frequency
    or presence penalty (P slots, doubling when full).

    The host hands out slots at once, but every change to the tensors runs as device work, in stream order
    (`take_ops` at a step's launch, `apply` at the start of that step's device work): a slot freed by a finished
    request may still be counted into by a step in flight, and a GPU (or a test's ThreadStream) runs that step after the host went on."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.V, self.device = vocab_size, device
        # float32 [P, V]: occurrences of each token in the request's output so far (every sampled token included,
        # on the device, before the host learns it).
        self.output_counts_PV = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        # bool [P, V]: the token occurs in the prompt.
        self.prompt_seen_PV = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._num_slots = 0  # the host's count; the tensors reach it when the ops that need it are applied
        self._free: list[int] = []
        self._ops: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def add(self, prompt_token_ids: list[int], output_token_ids: list[int]) -> int:
        """A slot for a request with these tokens (ids outside [0, V) ignored); filled by the next step's device
        work."""
        if not self._free:
            n = self._num_slots
            self._num_slots = max(8, 2 * n)
            self._free.extend(range(self._num_slots - 1, n - 1, -1))
        slot = self._free.pop()
        self._ops.append((slot, self._num_slots, self._ids(prompt_token_ids), self._ids(output_token_ids)))
        return slot

    def _ids(self, token_ids: list[int]) -> torch.Tensor:
        ids = np.asarray(token_ids, dtype=np.int64)
        return to_device(ids[(ids >= 0) & (ids < self.V)], torch.long, self.device)

    def remove(self, slot: int) -> None:
        self._free.append(slot)

    def take_ops(self) -> list:
        """The slot fills since the last call, for a step's device work to `apply` (host side, at launch)."""
        ops, self._ops = self._ops, []
        return ops

    def apply(self, ops: list) -> None:
        """Device work: grow the tensors to what the ops need, then fill their slots."""
        for slot, num_slots, prompt_ids, output_ids in ops:
            have = self.output_counts_PV.shape[0]
            if have < num_slots:
                counts = torch.zeros(num_slots, self.V, dtype=torch.float32, device=self.device)
                seen = torch.zeros(num_slots, self.V, dtype=torch.bool, device=self.device)
                counts[:have].copy_(self.output_counts_PV)
                seen[:have].copy_(self.prompt_seen_PV)
                self.output_counts_PV, self.prompt_seen_PV = counts, seen
            self.output_counts_PV[slot].zero_()
            self.prompt_seen_PV[slot].zero_()
            if output_ids.numel():
                ones = torch.ones(output_ids.shape, dtype=torch.float32, device=self.device)
                self.output_counts_PV[slot].index_put_((output_ids,), ones, accumulate=True)
            if prompt_ids.numel():
                self.prompt_seen_PV[slot, prompt_ids] = True

    def record(self, slots_Q: torch.Tensor, token_ids_Q: torch.Tensor) -> None:
        """Device work: count a step's sampled ids (long [Q] slots and ids on the device; no host sync)."""
        ones_Q = torch.ones(slots_Q.shape, dtype=torch.float32, device=slots_Q.device)
        self.output_counts_PV.index_put_((slots_Q, token_ids_Q), ones_Q, accumulate=True)


class PersistentBatch:
    """The rows of one runner's requests (module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 64, block_cols: int = 16):
        self.V, self.device = vocab_size, device
        self.states: list[CachedRequestState | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self.block_table_RM = np.zeros((capacity, block_cols), dtype=np.int32)
        self.num_blocks_R = np.zeros(capacity, dtype=np.int64)
        # Sampling parameters, neutral on greedy and empty rows (as SamplingMetadata.build makes them).
        self.greedy_R = np.ones(capacity, dtype=bool)
        self.temperature_R = np.ones(capacity, dtype=np.float32)
        self.top_k_R = np.full(capacity, vocab_size, dtype=np.int64)  # V: disabled
        self.top_p_R = np.ones(capacity, dtype=np.float32)
        self.min_p_R = np.zeros(capacity, dtype=np.float32)
        self.repetition_R = np.ones(capacity, dtype=np.float32)
        self.frequency_R = np.zeros(capacity, dtype=np.float32)
        self.presence_R = np.zeros(capacity, dtype=np.float32)
        self.penalty_slot_R = np.full(capacity, -1, dtype=np.int64)
        self.penalties: PenaltyCounts | None = None  # made by the first penalised request
        # vLLM's logits processors (logit_bias, allowed_token_ids, bad_words): engine/rank/logits_rules.py.
        self.rules_slot_R = np.full(capacity, -1, dtype=np.int64)
        self.rules: LogitsRules | None = None  # made by the first request that sets one
        self.num_rules = 0
        # Rows using each feature: a step whose batch has none of them skips that feature's work.
        self.num_random = self.num_top_k = self.num_top_p = self.num_min_p = 0
        self.num_penalised = self.num_repetition = self.num_seeded = self.num_min_tokens = self.num_logprobs = 0

    def __len__(self) -> int:
        return len(self.states) - len(self._free)

    # -- rows -------------------------------------------------------------------
    def add(self, st: CachedRequestState) -> int:
        """Give `st` a row: its blocks move into the table (`st.block_arr` becomes the row's view), its sampling
        parameters into the arrays."""
        if not self._free:
            self._grow_rows()
        r = self._free.pop()
        n = len(st.block_ids)
        if n > self.block_table_RM.shape[1]:
            self._grow_cols(n)
        self.block_table_RM[r, :n] = st.block_arr[:n]
        self.states[r] = st
        self.num_blocks_R[r] = n
        st.row, st.batch = r, self
        st.block_arr = self.block_table_RM[r]
        p = st.params
        greedy = p.greedy
        if not greedy:
            self.greedy_R[r] = False
            self.temperature_R[r] = p.temperature
            self.num_random += 1
            if 0 < p.top_k < self.V:
                self.top_k_R[r] = p.top_k
                self.num_top_k += 1
            if p.top_p < 1.0:
                self.top_p_R[r] = p.top_p
                self.num_top_p += 1
            if p.min_p > 0.0:
                self.min_p_R[r] = p.min_p
                self.num_min_p += 1
            if st.generator is not None:
                self.num_seeded += 1
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            if self.penalties is None:
                self.penalties = PenaltyCounts(self.V, self.device)
            self.penalty_slot_R[r] = self.penalties.add(st.prompt_token_ids, st.output_token_ids)
            self.repetition_R[r] = p.repetition_penalty
            self.frequency_R[r] = p.frequency_penalty
            self.presence_R[r] = p.presence_penalty
            self.num_penalised += 1
            self.num_repetition += p.repetition_penalty != 1.0
        if p.logits_rules:
            if self.rules is None:
                self.rules = LogitsRules(self.V, self.device)
            self.rules_slot_R[r] = self.rules.add(p, st.output_token_ids)
            self.num_rules += 1
        self.num_min_tokens += p.min_tokens > 0
        self.num_logprobs += p.logprobs is not None
        return r

    def remove(self, st: CachedRequestState) -> None:
        """Free `st`'s row (its state is dropped: finished, aborted or preempted)."""
        r = st.row
        if r is None or self.states[r] is not st:
            return
        p = st.params
        if not self.greedy_R[r]:
            self.num_random -= 1
            self.num_top_k -= bool(self.top_k_R[r] < self.V)
            self.num_top_p -= bool(self.top_p_R[r] < 1.0)
            self.num_min_p -= bool(self.min_p_R[r] > 0.0)
            self.num_seeded -= st.generator is not None
        slot = int(self.penalty_slot_R[r])
        if slot >= 0:
            self.penalties.remove(slot)
            self.num_penalised -= 1
            self.num_repetition -= bool(self.repetition_R[r] != 1.0)
        rule_slot = int(self.rules_slot_R[r])
        if rule_slot >= 0:
            self.rules.remove(rule_slot)
            self.num_rules -= 1
            self.rules_slot_R[r] = -1
        self.num_min_tokens -= p.min_tokens > 0
        self.num_logprobs -= p.logprobs is not None
        self.greedy_R[r], self.temperature_R[r], self.top_k_R[r] = True, 1.0, self.V
        self.top_p_R[r], self.min_p_R[r] = 1.0, 0.0
        self.repetition_R[r], self.frequency_R[r], self.presence_R[r] = 1.0, 0.0, 0.0
        self.penalty_slot_R[r] = -1
        # The state keeps its own copy of its table: the row goes to another request.
        st.block_arr = self.block_table_RM[r, : max(16, 2 * int(self.num_blocks_R[r]))].copy()
        self.num_blocks_R[r] = 0
        st.row = st.batch = None
        self.states[r] = None
        self._free.append(r)

    def clear(self) -> None:
        for st in [s for s in self.states if s is not None]:
            self.remove(st)

    def add_blocks(self, st: CachedRequestState, new_block_ids: list[int]) -> None:
        """Append blocks to `st`'s row (called by `CachedRequestState.add_blocks`)."""
        r, n, k = st.row, int(self.num_blocks_R[st.row]), len(new_block_ids)
        if n + k > self.block_table_RM.shape[1]:
            self._grow_cols(n + k)
        self.block_table_RM[r, n : n + k] = new_block_ids
        self.num_blocks_R[r] = n + k

    # -- one step ------------------------------------------------------------------
    def take_device_ops(self) -> list:
        """What the next step's device work must apply first (`apply_device_ops`): the penalty and logits-rule
        slots filled since the last step (empty when none)."""
        ops: list = self.penalties.take_ops() if self.penalties is not None else []
        return ops + self.rules.take_ops() if self.rules is not None else ops

    def apply_device_ops(self, ops: list) -> None:
        if not ops:
            return
        fills = [op for op in ops if isinstance(op, RuleFill)]
        if len(fills) < len(ops):
            self.penalties.apply([op for op in ops if not isinstance(op, RuleFill)])
        if fills:
            self.rules.apply(fills)

    def rows_of(self, states: list[CachedRequestState]) -> np.ndarray:
        return np.fromiter((st.row for st in states), dtype=np.intp, count=len(states))

    def tables(self, rows_S: np.ndarray) -> np.ndarray:
        """int32 [S, M]: the block tables of these rows, as wide as the longest."""
        width = int(self.num_blocks_R[rows_S].max()) if len(rows_S) else 0
        return self.block_table_RM[rows_S, :width]

    # -- growth ----------------------------------------------------------------------
    def _grow_rows(self) -> None:
        R = len(self.states)
        for name in ("block_table_RM", "num_blocks_R", "greedy_R", "temperature_R", "top_k_R", "top_p_R", "min_p_R",
                     "repetition_R", "frequency_R", "presence_R", "penalty_slot_R", "rules_slot_R"):
            old = getattr(self, name)
            new = np.empty((2 * R,) + old.shape[1:], dtype=old.dtype)
            new[:R] = old
            new[R:] = _NEUTRAL.get(name, 0) if name != "top_k_R" else self.V
            setattr(self, name, new)
        self.states.extend([None] * R)
        self._free.extend(range(2 * R - 1, R - 1, -1))
        self._rebind_views()

    def _grow_cols(self, need: int) -> None:
        R, M = self.block_table_RM.shape
        grown = np.zeros((R, max(need, 2 * M)), dtype=np.int32)
        grown[:, :M] = self.block_table_RM
        self.block_table_RM = grown
        self._rebind_views()

    def _rebind_views(self) -> None:
        for r, st in enumerate(self.states):
            if st is not None:
                st.block_arr = self.block_table_RM[r]


# What a grown row holds before a request takes it (the neutral sampling values; top_k_R: V).
_NEUTRAL = {"greedy_R": True, "temperature_R": 1.0, "top_p_R": 1.0, "repetition_R": 1.0, "penalty_slot_R": -1,
            "rules_slot_R": -1}


__all__ = ["PenaltyCounts", "PersistentBatch"]
