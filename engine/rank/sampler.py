"""Turn one step's logits into next tokens (vLLM v1 order and semantics).

Shape legend:
    B  rows in the batch (one per request that samples this step)
    V  vocabulary size (the logits' last dim)
    L  rows that asked for logprobs
    N  the largest top-n any row asked for
    K  the largest top-k any row uses (top-k-only path)
    M  (row, token) pairs blocked by min_tokens

Order of a step:
    1. logprobs of the *raw* model distribution (before any processing, as in
       vLLM v1, so a client sees what the model thought);
    2. penalties (repetition, frequency, presence), then min_tokens blocking, then the structured-output
       grammar's bitmask (tokens the grammar forbids get -inf);
    3. greedy rows take the argmax here;
    4. other rows: temperature, min-p, top-k, top-p, then an exponential race.

Everything runs in float32 whatever the model dtype, batched over rows; the
only Python loop over rows is the per-generator draw of seeded rows. The
sampler makes no device→host sync: the tokens stay on the device and the logprob rows come back packed in one
block (`SamplerOutput.logprobs_packed_LX`), which the runner copies to the host without a wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moelink.engine.rank.device_stream import to_device
from moelink.engine.contract.sampling_params import SamplingParams
from moelink.scheduler.outputs import TokenLogprobs

if TYPE_CHECKING:
    from moelink.engine.rank.input_batch import PenaltyCounts, PersistentBatch

_NEG_INF = float("-inf")


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
        if grammar_bitmasks is not None and any(m is not None for m in grammar_bitmasks):
            meta.grammar_allowed_BV = _unpack_bitmasks(grammar_bitmasks, V, device)

        if meta.all_greedy:
            return meta
        if not meta.all_random:
            meta.greedy_mask_B = to_device(greedy, torch.bool, device)
        # Greedy rows get neutral values so the batched random path is a no-op on them.
        meta.temperature_B = to_device([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32,
                                       device)
        top_k = [V if g or p.top_k <= 0 or p.top_k >= V else p.top_k for p, g in zip(params, greedy)]
        if any(k < V for k in top_k):
            meta.top_k_B = to_device(top_k, torch.long, device)
            meta.max_top_k = max(k for k in top_k if k < V)
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        if any(p < 1.0 for p in top_p):
            meta.top_p_B = to_device(top_p, torch.float32, device)
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        if any(p > 0.0 for p in min_p):
            meta.min_p_B = to_device(min_p, torch.float32, device)
        meta._take_generators(generators, greedy, device)
        meta.any_unseeded_random = len(meta.generators) < B - sum(greedy)
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
        if batch.num_min_tokens:
            meta._build_min_tokens([st.params for st in states], [len(st.output_token_ids) for st in states],
                                   num_pending, eos_token_ids, device)
        if grammar_bitmasks is not None and any(m is not None for m in grammar_bitmasks):
            meta.grammar_allowed_BV = _unpack_bitmasks(grammar_bitmasks, V, device)

        if meta.all_greedy:
            return meta
        if not meta.all_random:
            meta.greedy_mask_B = to_device(greedy_B, torch.bool, device)
        meta.temperature_B = to_device(batch.temperature_R[rows_B], torch.float32, device)
        if batch.num_top_k:
            top_k_B = batch.top_k_R[rows_B]
            enabled = top_k_B < V
            if enabled.any():
                meta.top_k_B = to_device(top_k_B, torch.long, device)
                meta.max_top_k = int(top_k_B[enabled].max())
        if batch.num_top_p:
            top_p_B = batch.top_p_R[rows_B]
            if (top_p_B < 1.0).any():
                meta.top_p_B = to_device(top_p_B, torch.float32, device)
        if batch.num_min_p:
            min_p_B = batch.min_p_R[rows_B]
            if (min_p_B > 0.0).any():
                meta.min_p_B = to_device(min_p_B, torch.float32, device)
        if batch.num_seeded:
            meta._take_generators([st.generator for st in states], greedy_B.tolist(), device)
        meta.any_unseeded_random = len(meta.generators) < B - num_greedy
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
        blocked = [
            (i, t)
            for i, p in enumerate(params)
            if p.min_tokens and num_outputs[i] + (num_pending[i] if num_pending else 0) < p.min_tokens
            # vLLM: with ignore_eos, eos does not stop, so there is nothing to hold back.
            for t in sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids)))
            if 0 <= t < self.vocab_size
        ]
        if blocked:
            rows, ids = zip(*blocked)
            self.min_tokens_rows_M = to_device(rows, torch.long, device)
            self.min_tokens_ids_M = to_device(ids, torch.long, device)

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
        """After sampling (`from_batch` metadata): count the penalised rows' new tokens on the device."""
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


def _unpack_bitmasks(masks: list[Optional[bytes]], V: int, device: torch.device) -> torch.Tensor:
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


@dataclass
class SamplerOutput:
    # long [B]: the chosen token per row (left on the logits' device).
    token_ids_B: torch.Tensor
    # float32 [L, 3 + 2N] on the device: the logprob rows packed for one transfer (`unpack_logprobs`); None
    # when no row asked for logprobs.
    logprobs_packed_LX: Optional[torch.Tensor] = None
    # Per row: None (no logprobs) or n (top-n), and N, the largest n: how to unpack.
    num_logprobs: list[Optional[int]] = field(default_factory=list)
    max_num_logprobs: int = 0

    @property
    def logprobs(self) -> list[Optional[TokenLogprobs]]:
        """Per row: None unless the row asked for logprobs. Reads the packed block (a device→host sync); the
        runner instead copies it without a wait and unpacks it after the step (`unpack_logprobs`)."""
        if self.logprobs_packed_LX is None:
            return [None] * self.token_ids_B.shape[0]
        packed = self.logprobs_packed_LX.tolist()  # device→host sync: the sampler's one logprobs transfer
        return unpack_logprobs(packed, self.num_logprobs, self.max_num_logprobs)


class Sampler:
    """Stateless: all per-request state lives in SamplingMetadata and its generators."""

    def __call__(self, logits_BV: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row.

        logits_BV: [B, V], any float dtype, on any device; not modified.
        Returns token ids as long [B] on the same device.
        """
        B, V = logits_BV.shape
        if B != meta.num_rows or V != meta.vocab_size:
            raise ValueError(
                f"Sampler: logits shape {tuple(logits_BV.shape)} does not match the metadata "
                f"({meta.num_rows} rows, vocab {meta.vocab_size})."
            )
        if (meta.all_greedy and meta.no_penalties and meta.no_min_tokens and meta.no_logprobs
                and meta.grammar_allowed_BV is None):
            # Casting to float32 is monotone and exact, so argmax needs no cast.
            return SamplerOutput(logits_BV.argmax(dim=-1))

        # Our own float32 copy: every step below may then work in place.
        logits = logits_BV.to(dtype=torch.float32, copy=True)
        logprobs_LV = None
        if not meta.no_logprobs:
            logprobs_LV = torch.log_softmax(logits[meta.logprob_rows_L], dim=-1)

        if not meta.no_penalties:
            _apply_penalties(logits, meta)
        if not meta.no_min_tokens:
            logits.index_put_((meta.min_tokens_rows_M, meta.min_tokens_ids_M), logits.new_full((), _NEG_INF))
        if meta.grammar_allowed_BV is not None:
            logits.masked_fill_(~meta.grammar_allowed_BV, _NEG_INF)

        if meta.all_greedy:
            token_ids_B = logits.argmax(dim=-1)
        else:
            greedy_B = None if meta.all_random else logits.argmax(dim=-1)
            token_ids_B = self._sample_random(logits, meta)
            if greedy_B is not None:
                token_ids_B = torch.where(meta.greedy_mask_B, greedy_B, token_ids_B)

        if logprobs_LV is None:
            return SamplerOutput(token_ids_B)
        return SamplerOutput(token_ids_B, _pack_logprobs(logprobs_LV, token_ids_B, meta), meta.num_logprobs,
                             meta.max_num_logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        logits.div_(meta.temperature_B.unsqueeze(1))
        if meta.min_p_B is not None:
            probs = logits.softmax(dim=-1)
            threshold_B1 = probs.amax(dim=-1, keepdim=True) * meta.min_p_B.unsqueeze(1)
            logits.masked_fill_(probs < threshold_B1, _NEG_INF)
        if meta.top_p_B is not None:
            logits = _apply_top_k_top_p_sorted(logits, meta.top_k_B, meta.top_p_B)
        elif meta.top_k_B is not None:
            _apply_top_k_only(logits, meta.top_k_B, meta.max_top_k)
        probs = logits.softmax(dim=-1)
        return _exponential_race(probs, meta)


def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    counts_BV, seen_BV = meta.penalty_tensors()
    if seen_BV is not None:
        # HF/vLLM: shrink positive logits, push negative ones further down.
        pen_BV = torch.where(seen_BV, meta.repetition_penalty_B.unsqueeze(1), 1.0)
        logits.copy_(torch.where(logits > 0, logits / pen_BV, logits * pen_BV))
    logits.sub_(meta.frequency_penalty_B.unsqueeze(1) * counts_BV)
    logits.sub_(meta.presence_penalty_B.unsqueeze(1) * (counts_BV > 0))


def _apply_top_k_only(logits: torch.Tensor, top_k_B: torch.Tensor, k_max: int) -> None:
    """Keep tokens >= each row's k-th largest logit (ties at the k-th all stay)."""
    V = logits.shape[1]
    enabled_B = top_k_B < V
    # topk over the largest k used beats a full sort when k << V.
    top_BK = logits.topk(k_max, dim=-1).values
    kth_B1 = top_BK.gather(1, (top_k_B.clamp(max=k_max) - 1).unsqueeze(1))
    kth_B1.masked_fill_(~enabled_B.unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < kth_B1, _NEG_INF)


def _apply_top_k_top_p_sorted(logits: torch.Tensor, top_k_B, top_p_B: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p on the renormalised survivors; one ascending sort for both."""
    V = logits.shape[1]
    sorted_BV, idx_BV = logits.sort(dim=-1, descending=False)
    if top_k_B is not None:
        # Ascending, so the k-th largest sits at V - k (disabled rows: k = V → column 0).
        kth_B1 = sorted_BV.gather(1, (V - top_k_B).unsqueeze(1))
        sorted_BV.masked_fill_(sorted_BV < kth_B1, _NEG_INF)
    cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    # A token goes when the mass strictly above it already reaches top_p: what is
    # left is the smallest set with cumulative prob >= top_p. The top token
    # (last column) always stays, even against float rounding.
    drop_BV = cum_BV <= (1.0 - top_p_B).unsqueeze(1)
    drop_BV[:, -1] = False
    sorted_BV.masked_fill_(drop_BV, _NEG_INF)
    return logits.scatter_(1, idx_BV, sorted_BV)


def _exponential_race(probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1), picks token i with probability p_i, with no cumsum or sync."""
    q_BV = torch.empty_like(probs)
    if meta.any_unseeded_random:
        q_BV.exponential_()  # one draw from the device's default generator for unseeded rows
    elif not meta.all_random:
        q_BV.fill_(1.0)  # greedy rows' results are discarded; keep them finite
    for row, gen in meta.generators.items():
        # Each seeded row draws exactly V values from its own generator, so its
        # tokens are the same whatever else shares the batch.
        q_BV[row].exponential_(generator=gen)
    # Exp(1) can return 0; masked tokens (p = 0) would then give 0/0 = nan,
    # which argmax treats as the largest value.
    q_BV.clamp_(min=torch.finfo(torch.float32).tiny)
    return probs.div_(q_BV).argmax(dim=-1)


def _pack_logprobs(logprobs_LV: torch.Tensor, token_ids_B: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """float32 [L, 3 + 2N]: per logprob row its sampled id, logprob and rank, then the top-N ids and logprobs
    (ids and ranks < 2**24 are exact in float32), so they cross to the host in one transfer."""
    rows_L = meta.logprob_rows_L
    N = meta.max_num_logprobs
    tok_L1 = token_ids_B[rows_L].unsqueeze(1)
    tok_lp_L1 = logprobs_LV.gather(1, tok_L1)
    # Rank 1 = best; ties with the sampled token count in its favour.
    rank_L1 = (logprobs_LV > tok_lp_L1).sum(dim=-1, keepdim=True) + 1
    top_lp_LN, top_id_LN = logprobs_LV.topk(N, dim=-1)  # sorted, best first
    return torch.cat([tok_L1.float(), tok_lp_L1, rank_L1.float(), top_id_LN.float(), top_lp_LN], dim=1)


def unpack_logprobs(packed: list[list[float]], num_logprobs: list[Optional[int]], N: int
                    ) -> list[Optional[TokenLogprobs]]:
    """The host side of `_pack_logprobs`: one TokenLogprobs per row that asked (None for the others)."""
    out: list[Optional[TokenLogprobs]] = [None] * len(num_logprobs)
    rows = [i for i, n in enumerate(num_logprobs) if n is not None]
    for row, vals in zip(rows, packed):
        n = min(num_logprobs[row], N)
        top = [(int(t), lp) for t, lp in zip(vals[3 : 3 + n], vals[3 + N : 3 + N + n])]
        out[row] = TokenLogprobs(token_id=int(vals[0]), logprob=vals[1], rank=int(vals[2]), top=top)
    return out
