"""SamplingMetadata: one step's sampling parameters, batched per row into tensors on the device.

The host side of sampling. Each step the runner turns its rows' SamplingParams (and, for penalties, their
token histories; for structured output, their grammar bitmasks) into the tensors the sampler reads
(engine/rank/sampler.py): `SamplingMetadata.build` from per-row lists, `SamplingMetadata.from_batch` from the
runner's persistent batch (engine/rank/input_batch.py), gathered from its arrays. Both build only what some
row needs (a tensor no row uses stays None), so an all-greedy step builds almost nothing. It lives apart from
the sampler because it is bookkeeping (which rows want what, host to device copies), not the per-step math on
the logits. Shape letters: see engine/rank/sampler.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moelink.engine.contract.host_copy import to_device
from moelink.engine.contract.sampling_params import SamplingParams

from .logits_rules import StepRules, record_tails

if TYPE_CHECKING:
    from moelink.engine.rank.input_batch import PenaltyCounts, PersistentBatch

@dataclass
class SamplingMetadata:
    """Per-step batched sampling inputs; build with `SamplingMetadata.build`.

    Tensors that no row needs are None, so the common all-greedy step builds
    nothing but the logprob bookkeeping lists. Row i of every tensor is row i
    of the logits.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # bool [B]; only for a mix of greedy and random rows.
    greedy_mask_B: Optional[torch.Tensor] = None
    # float32 [B], 1.0 on greedy rows (never divides by 0); None when all greedy.
    temperature_B: Optional[torch.Tensor] = None
    # long [B], V where disabled; None when no random row uses top-k.
    top_k_B: Optional[torch.Tensor] = None
    # Largest enabled top-k, known on the host so top-k needs no sync.
    max_top_k: int = 0
    # float32 [B], 1.0 where disabled; None when no random row uses top-p.
    top_p_B: Optional[torch.Tensor] = None
    # float32 [B], 0.0 where disabled; None when no random row uses min-p.
    min_p_B: Optional[torch.Tensor] = None
    # Seeded random rows only: greedy rows never draw, so never advance theirs.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Some random row has no generator, so the batch draws from the device default.
    any_unseeded_random: bool = False

    no_penalties: bool = True
    # float32 [B]; None when no_penalties.
    repetition_penalty_B: Optional[torch.Tensor] = None
    frequency_penalty_B: Optional[torch.Tensor] = None
    presence_penalty_B: Optional[torch.Tensor] = None
    # float32 [B, V]: how often each token occurs in the row's output so far.
    output_counts_BV: Optional[torch.Tensor] = None
    # bool [B, V]: token occurs in prompt or output; only with a repetition penalty.
    seen_mask_BV: Optional[torch.Tensor] = None
    # The persistent batch's path (`from_batch`): the counts live on the device (input_batch.PenaltyCounts) and
    # are gathered when the sampler runs, in stream order, so the tokens of steps still in flight count. long [B]
    # slots (rows without penalties point at slot 0 with neutral penalties); whether a repetition penalty needs
    # the seen mask; and the rows (long [Q]) and slots (long [Q]) whose sampled ids `record_penalised` counts.
    penalty_counts: Optional["PenaltyCounts"] = None
    penalty_slots_B: Optional[torch.Tensor] = None
    penalty_needs_seen: bool = False
    penalised_rows_Q: Optional[torch.Tensor] = None
    penalised_slots_Q: Optional[torch.Tensor] = None

    # long [M] each: logits[row, token] = -inf while the row is below min_tokens.
    min_tokens_rows_M: Optional[torch.Tensor] = None
    min_tokens_ids_M: Optional[torch.Tensor] = None

    # Per row: None (no logprobs) or n (top-n; 0 = only the sampled token).
    num_logprobs: list[Optional[int]] = field(default_factory=list)
    # long [L]: the rows whose num_logprobs is not None; None when L = 0.
    logprob_rows_L: Optional[torch.Tensor] = None
    max_num_logprobs: int = 0

    # bool [B, V]: False where a constrained row's grammar forbids the token; None when no row is constrained.
    grammar_allowed_BV: Optional[torch.Tensor] = None
    # The rows with a logit bias, allowed ids or bad words (engine/rank/logits_rules.py); None when no row sets one.
    logits_rules: Optional[StepRules] = None

    @property
    def no_logprobs(self) -> bool:
        return self.logprob_rows_L is None

    @property
    def no_min_tokens(self) -> bool:
        return self.min_tokens_rows_M is None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[Optional[torch.Generator]],
        eos_token_ids: set[int],
        vocab_size: int,
        device: torch.device,
        grammar_bitmasks: Optional[list[Optional[bytes]]] = None,
        num_pending: Optional[list[int]] = None,
    ) -> "SamplingMetadata":
        """Batch one step's per-request parameters into tensors on `device`.

        All lists are indexed by row and must have the same length. Token ids
        outside [0, vocab_size) are ignored by penalties and min_tokens.
        `grammar_bitmasks`: per row None (unconstrained) or the row's allowed tokens as little-endian
        int32 words, bit t of word t // 32 for token t (xgrammar's layout).
        `num_pending`: per row, output tokens sampled by a step still in flight (the overlapped loop), which
        `output_token_ids` does not hold yet: they count for min_tokens (the runner's penalties count them on the
        device: `from_batch`).
        """
        B, V = len(params), vocab_size
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == B):
            raise ValueError(
                f"SamplingMetadata.build needs one entry per row in every list; got "
                f"{B} params, {len(prompt_token_ids)} prompts, {len(output_token_ids)} outputs, "
                f"{len(generators)} generators."
            )
        device = torch.device(device)
        greedy = [p.greedy for p in params]
        meta = cls(num_rows=B, vocab_size=V, all_greedy=all(greedy), all_random=not any(greedy))

        meta._build_logprobs([p.logprobs for p in params], device)

        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            meta._build_penalties(params, prompt_token_ids, output_token_ids, device)

        meta._build_min_tokens(params, [len(ids) for ids in output_token_ids], num_pending, eos_token_ids, device)
        meta._build_grammar(grammar_bitmasks, device)
        if meta.all_greedy:
            return meta
        # Greedy rows get neutral values so the batched random path is a no-op on them.
        rows = list(zip(params, greedy))
        meta._build_random(
            np.asarray(greedy, dtype=bool),
            np.asarray([1.0 if g else p.temperature for p, g in rows], dtype=np.float64),
            np.asarray([V if g or p.top_k <= 0 or p.top_k >= V else p.top_k for p, g in rows], dtype=np.int64),
            np.asarray([1.0 if g else p.top_p for p, g in rows], dtype=np.float64),
            np.asarray([0.0 if g else p.min_p for p, g in rows], dtype=np.float64),
            generators, device)
        return meta

    @classmethod
    def from_batch(
        cls,
        batch: "PersistentBatch",
        rows_B: np.ndarray,
        states: list,
        eos_token_ids: set[int],
        device: torch.device,
        grammar_bitmasks: Optional[list[Optional[bytes]]] = None,
        num_pending: Optional[list[int]] = None,
    ) -> "SamplingMetadata":
        """The same metadata as `build`, from the runner's persistent batch (engine/rank/input_batch.py): `rows_B`
        are the batch rows of the sampling rows, `states` their CachedRequestStates in the same order. The
        parameters are gathered from the batch's arrays (nothing per row in Python unless a feature needs it:
        seeds, min_tokens, logprobs), and the penalties' counts stay on the device (`penalty_counts`)."""
        B, V = len(rows_B), batch.V
        greedy_B = batch.greedy_R[rows_B] if batch.num_random else np.ones(B, dtype=bool)
        num_greedy = int(greedy_B.sum())
        meta = cls(num_rows=B, vocab_size=V, all_greedy=num_greedy == B, all_random=num_greedy == 0)
        if batch.num_logprobs:
            meta._build_logprobs([st.params.logprobs for st in states], device)
        else:
            meta.num_logprobs = [None] * B
        if batch.num_penalised:
            slots_B = batch.penalty_slot_R[rows_B]
            has_B = slots_B >= 0
            if has_B.any():
                meta.no_penalties = False
                meta.repetition_penalty_B = to_device(batch.repetition_R[rows_B], torch.float32, device)
                meta.frequency_penalty_B = to_device(batch.frequency_R[rows_B], torch.float32, device)
                meta.presence_penalty_B = to_device(batch.presence_R[rows_B], torch.float32, device)
                meta.penalty_counts = batch.penalties
                meta.penalty_slots_B = to_device(np.where(has_B, slots_B, 0), torch.long, device)
                meta.penalty_needs_seen = bool((batch.repetition_R[rows_B] != 1.0).any())
                meta.penalised_rows_Q = to_device(np.flatnonzero(has_B), torch.long, device)
                meta.penalised_slots_Q = to_device(slots_B[has_B], torch.long, device)
        if batch.num_rules:
            slots_B = batch.rules_slot_R[rows_B]
            has_B = slots_B >= 0
            if has_B.any():
                meta.logits_rules = batch.rules.for_step(np.flatnonzero(has_B), slots_B[has_B])
        if batch.num_min_tokens:
            meta._build_min_tokens([st.params for st in states], [len(st.output_token_ids) for st in states],
                                   num_pending, eos_token_ids, device)
        meta._build_grammar(grammar_bitmasks, device)
        if meta.all_greedy:
            return meta
        # The batch's arrays hold neutral values on greedy rows and on rows without a filter; a filter no row
        # of the batch uses is not even gathered.
        meta._build_random(
            greedy_B, batch.temperature_R[rows_B],
            batch.top_k_R[rows_B] if batch.num_top_k else None,
            batch.top_p_R[rows_B] if batch.num_top_p else None,
            batch.min_p_R[rows_B] if batch.num_min_p else None,
            [st.generator for st in states] if batch.num_seeded else None, device)
        return meta

    def _build_logprobs(self, num_logprobs: list[Optional[int]], device: torch.device) -> None:
        """Per row None or top-n; the rows that asked, and the largest n (capped at the vocabulary)."""
        self.num_logprobs = num_logprobs
        lp_rows = [i for i, n in enumerate(num_logprobs) if n is not None]
        if lp_rows:
            self.logprob_rows_L = to_device(lp_rows, torch.long, device)
            self.max_num_logprobs = min(self.vocab_size, max(num_logprobs[i] for i in lp_rows))

    def _build_min_tokens(self, params, num_outputs: list[int], num_pending: Optional[list[int]],
                          eos_token_ids: set[int], device: torch.device) -> None:
        """Block a row's stop ids and EOS while it has fewer than min_tokens outputs (those still on the device
        included: `num_pending`)."""
        rows = [i for i, p in enumerate(params)
                if p.min_tokens and num_outputs[i] + (num_pending[i] if num_pending else 0) < p.min_tokens]
        if not rows:
            return
        # Per row, numpy rather than a Python set of up to --max-stop-token-ids ids: this runs every step while a
        # row's min_tokens is unmet, on the rank's host thread (issue 95 item 3).
        eos_N = np.fromiter(eos_token_ids, dtype=np.int64, count=len(eos_token_ids))
        per_row = []
        for i in rows:
            p = params[i]
            stop_N = np.asarray(p.stop_token_ids, dtype=np.int64).reshape(-1)
            # vLLM: with ignore_eos, eos does not stop, so there is nothing to hold back.
            ids_N = np.unique(stop_N if p.ignore_eos else np.concatenate([stop_N, eos_N]))
            per_row.append(ids_N[(ids_N >= 0) & (ids_N < self.vocab_size)])
        counts = [len(ids) for ids in per_row]
        if sum(counts):
            self.min_tokens_rows_M = to_device(np.repeat(np.asarray(rows, dtype=np.int64), counts), torch.long,
                                               device)
            self.min_tokens_ids_M = to_device(np.concatenate(per_row), torch.long, device)

    def _build_grammar(self, grammar_bitmasks: Optional[list[Optional[bytes]]], device: torch.device) -> None:
        if grammar_bitmasks is not None and any(m is not None for m in grammar_bitmasks):
            self.grammar_allowed_BV = unpack_bitmasks(grammar_bitmasks, self.vocab_size, device)

    def _build_random(self, greedy_B: np.ndarray, temperature_B: np.ndarray, top_k_B: Optional[np.ndarray],
                      top_p_B: Optional[np.ndarray], min_p_B: Optional[np.ndarray], generators: Optional[list],
                      device: torch.device) -> None:
        """The random rows' parameters, both constructors' way: per row, with neutral values (temperature 1,
        top-k V, top-p 1, min-p 0) on greedy rows and where a filter is off; None for a filter, or for the
        generators, that no row uses. A filter's tensor is built only if some row turns it on."""
        V = self.vocab_size
        if not self.all_random:
            self.greedy_mask_B = to_device(greedy_B, torch.bool, device)
        self.temperature_B = to_device(temperature_B, torch.float32, device)
        if top_k_B is not None:
            enabled = top_k_B < V
            if enabled.any():
                self.top_k_B = to_device(top_k_B, torch.long, device)
                self.max_top_k = int(top_k_B[enabled].max())
        if top_p_B is not None and (top_p_B < 1.0).any():
            self.top_p_B = to_device(top_p_B, torch.float32, device)
        if min_p_B is not None and (min_p_B > 0.0).any():
            self.min_p_B = to_device(min_p_B, torch.float32, device)
        if generators is not None:
            self._take_generators(generators, greedy_B.tolist(), device)
        self.any_unseeded_random = len(self.generators) < self.num_rows - int(greedy_B.sum())

    def _take_generators(self, generators: list, greedy: list[bool], device: torch.device) -> None:
        for i, (gen, g) in enumerate(zip(generators, greedy)):
            if gen is None or g:
                continue
            if gen.device.type != device.type:
                raise ValueError(
                    f"SamplingMetadata.build: generators[{i}] is on {gen.device}, "
                    f"but sampling runs on {device}; a generator must live on the sampling device."
                )
            self.generators[i] = gen

    def penalty_tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output counts float32 [B, V], seen mask bool [B, V] or None): built by `build`, or gathered now from
        the device counts (`from_batch`; called by the sampler, in stream order)."""
        if self.penalty_counts is None:
            return self.output_counts_BV, self.seen_mask_BV
        pc, slots_B = self.penalty_counts, self.penalty_slots_B
        counts_BV = pc.output_counts_PV.index_select(0, slots_B)
        seen_BV = pc.prompt_seen_PV.index_select(0, slots_B) | (counts_BV > 0) if self.penalty_needs_seen else None
        return counts_BV, seen_BV

    def record_penalised(self, token_ids_B: torch.Tensor) -> None:
        """After sampling (`from_batch` metadata): count the penalised rows' new tokens on the device, and move the
        bad words' tails on (logits_rules.record_tails)."""
        if self.logits_rules is not None:
            record_tails(self.logits_rules, token_ids_B)
        if self.penalised_rows_Q is not None:
            self.penalty_counts.record(self.penalised_slots_Q, token_ids_B.index_select(0, self.penalised_rows_Q))

    def _build_penalties(self, params, prompt_token_ids, output_token_ids, device) -> None:
        self.no_penalties = False
        self.repetition_penalty_B = to_device([p.repetition_penalty for p in params], torch.float32, device)
        self.frequency_penalty_B = to_device([p.frequency_penalty for p in params], torch.float32, device)
        self.presence_penalty_B = to_device([p.presence_penalty for p in params], torch.float32, device)
        self.output_counts_BV = _token_counts(output_token_ids, self.vocab_size, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            prompt_counts_BV = _token_counts(prompt_token_ids, self.vocab_size, device)
            self.seen_mask_BV = (prompt_counts_BV > 0) | (self.output_counts_BV > 0)


def unpack_bitmasks(masks: list[Optional[bytes]], V: int, device: torch.device) -> torch.Tensor:
    """bool [B, V] from per-row little-endian int32 bitmask bytes (None: every token allowed). The packed bytes
    cross to the device (V / 8 per row) and are unpacked there."""
    words = -(-V // 32)
    full = b"\xff" * (4 * words)
    # A bytearray: torch refuses to share a read-only buffer (bytes) without a warning.
    packed = np.frombuffer(bytearray(b"".join(full if m is None else m for m in masks)), dtype=np.uint8)
    packed_BW = to_device(packed.reshape(len(masks), 4 * words), torch.uint8, device)
    # Little-endian words: byte k holds tokens 8k..8k+7, lowest bit first.
    shifts_8 = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (packed_BW.unsqueeze(-1) >> shifts_8) & 1
    return bits.reshape(len(masks), -1)[:, :V].bool()


def _token_counts(token_ids: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """float32 [B, V]: occurrences of each token id per row (ids outside [0, V) dropped)."""
    B = len(token_ids)
    max_len = max((len(ids) for ids in token_ids), default=0)
    if max_len == 0:
        return torch.zeros(B, V, dtype=torch.float32, device=device)
    # Pad with V, a scratch column past the vocabulary that is sliced off below,
    # so the ragged rows scatter in one batched op.
    padded = [ids + [V] * (max_len - len(ids)) for ids in token_ids]
    ids_BT = to_device(padded, torch.long, device)
    ids_BT = ids_BT.masked_fill((ids_BT < 0) | (ids_BT > V), V)
    counts = torch.zeros(B, V + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids_BT, torch.ones_like(ids_BT, dtype=torch.float32))
    return counts[:, :V]
