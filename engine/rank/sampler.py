"""Turn one step's logits into next tokens (vLLM v1 order and semantics).

Shape legend:
    B  rows in the batch (one per request that samples this step)
    V  vocabulary size (the logits' last dim)
    L  rows that asked for logprobs
    N  the largest top-n any row asked for
    K  the largest top-k any row uses (top-k-only path)
    M  (row, token) pairs blocked by min_tokens

Order of a step:
    1. the structured-output grammar's bitmask (tokens the grammar forbids get -inf): vLLM v1 masks the logits
       before its sampler, so a logprob never names a token the grammar forbids;
    2. logprobs of that *raw* distribution (before any other processing, as in vLLM v1, so a client sees what the
       model thought among what it could emit);
    3. the requests' logits processors (logit_bias, allowed_token_ids, bad_words: engine/rank/logits_rules.py,
       vLLM's order: after the logprobs, before the penalties), penalties (repetition, frequency, presence), then
       min_tokens blocking;
    4. greedy rows take the argmax here;
    5. other rows: temperature, min-p, top-k, top-p, then an exponential race (vLLM's GPU draw); on a CPU a
       seeded row draws as vLLM 0.32's CPU sampler does instead (engine/rank/seeded_draw.py), so a seed gives
       vLLM's tokens there.

The step's inputs come batched per row in a SamplingMetadata (engine/rank/sampling_metadata.py: the host-side
bookkeeping of which row wants what); this module is the math on the logits, and the packing of the logprob
rows for their one transfer to the host (`unpack_logprobs` is the host side, used by the runner).

Everything runs in float32 whatever the model dtype, batched over rows; the
only Python loop over rows is the per-generator draw of seeded rows. The
sampler makes no device→host sync: the tokens stay on the device and the logprob rows come back packed in one
block (`SamplerOutput.logprobs_packed_LX`), which the runner copies to the host without a wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from moelink.engine.rank.sampling_metadata import SamplingMetadata
from moelink.kernels.cpu_native import greedy_ids
from moelink.scheduler.outputs import TokenLogprobs

from ..contract.logprob_rows import pack_token_logprobs, unpack_logprobs
from .logits_rules import apply_logits_rules
from .seeded_draw import draw_seeds, gumbel_argmax

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata"]

_NEG_INF = float("-inf")


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
                and meta.grammar_allowed_BV is None and meta.logits_rules is None):
            # Casting to float32 is monotone and exact, so argmax needs no cast. On a CPU the native pick (torch's
            # argmax over a vocabulary is ~15x its max there: kernels/cpu_native.greedy_ids), the same ids.
            return SamplerOutput(greedy_ids(logits_BV))

        # Our own float32 copy: every step below may then work in place.
        logits = logits_BV.to(dtype=torch.float32, copy=True)
        if meta.grammar_allowed_BV is not None:
            logits.masked_fill_(~meta.grammar_allowed_BV, _NEG_INF)
        logprobs_LV = None
        if not meta.no_logprobs:
            logprobs_LV = torch.log_softmax(logits[meta.logprob_rows_L], dim=-1)

        if meta.logits_rules is not None:
            apply_logits_rules(logits, meta.logits_rules)
        if not meta.no_penalties:
            apply_penalties(logits, meta)
        if not meta.no_min_tokens:
            logits.index_put_((meta.min_tokens_rows_M, meta.min_tokens_ids_M), logits.new_full((), _NEG_INF))

        if meta.all_greedy:
            token_ids_B = greedy_ids(logits)
        else:
            greedy_B = None if meta.all_random else greedy_ids(logits)
            token_ids_B = self._sample_random(logits, meta)
            if greedy_B is not None:
                token_ids_B = torch.where(meta.greedy_mask_B, greedy_B, token_ids_B)

        if logprobs_LV is None:
            return SamplerOutput(token_ids_B)
        return SamplerOutput(token_ids_B, _pack_logprobs(logprobs_LV, token_ids_B, meta), meta.num_logprobs,
                             meta.max_num_logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        logits = processed_logits(logits, meta)
        if not meta.generators or logits.device.type != "cpu":
            return _exponential_race(logits.softmax(dim=-1), meta, meta.generators)
        # On a CPU a seeded row draws as vLLM 0.32's CPU sampler does (engine/rank/seeded_draw.py), so a seed gives
        # vLLM's tokens; the other random rows keep the race.
        rows = list(meta.generators)
        seeded_S = gumbel_argmax(logits[rows], draw_seeds(list(meta.generators.values())))
        if len(rows) == meta.num_rows:
            return seeded_S
        token_ids_B = _exponential_race(logits.softmax(dim=-1), meta, {})
        token_ids_B[rows] = seeded_S
        return token_ids_B


def processed_probs(logits: torch.Tensor, meta) -> torch.Tensor:
    """The distribution a random row samples from: `processed_logits`, then softmax."""
    return processed_logits(logits, meta).softmax(dim=-1)


def processed_logits(logits: torch.Tensor, meta) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p applied to float32 `logits` (in place, vLLM's order; a token filtered out
    is -inf). `meta` needs temperature_B, min_p_B, top_k_B, top_p_B, max_top_k (a SamplingMetadata, or
    speculative decoding's per-position expansion of one: engine/spec/verify.py)."""
    logits.div_(meta.temperature_B.unsqueeze(1))
    if meta.min_p_B is not None:
        probs = logits.softmax(dim=-1)
        threshold_B1 = probs.amax(dim=-1, keepdim=True) * meta.min_p_B.unsqueeze(1)
        logits.masked_fill_(probs < threshold_B1, _NEG_INF)
    if meta.top_p_B is not None:
        logits = _apply_top_k_top_p_sorted(logits, meta.top_k_B, meta.top_p_B)
    elif meta.top_k_B is not None:
        _apply_top_k_only(logits, meta.top_k_B, meta.max_top_k)
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
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


def _exponential_race(probs: torch.Tensor, meta: SamplingMetadata,
                      generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1), picks token i with probability p_i, with no cumsum or sync (vLLM's GPU
    `random_sample`). Rows in `generators` draw q from their own; the others from the device's default."""
    q_BV = torch.empty_like(probs)
    if meta.any_unseeded_random:
        q_BV.exponential_()  # one draw from the device's default generator for unseeded rows
    elif not meta.all_random or len(generators) < len(meta.generators):
        q_BV.fill_(1.0)  # greedy rows' (and rows drawn apart) results are discarded; keep them finite
    for row, gen in generators.items():
        # Each seeded row draws exactly V values from its own generator, so its
        # tokens are the same whatever else shares the batch.
        q_BV[row].exponential_(generator=gen)
    # Exp(1) can return 0; masked tokens (p = 0) would then give 0/0 = nan,
    # which argmax treats as the largest value.
    q_BV.clamp_(min=torch.finfo(torch.float32).tiny)
    return probs.div_(q_BV).argmax(dim=-1)


def _pack_logprobs(logprobs_LV: torch.Tensor, token_ids_B: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The logprob rows of a sampling step: each row's sampled token (pack_token_logprobs)."""
    return pack_token_logprobs(logprobs_LV, token_ids_B[meta.logprob_rows_L], meta.max_num_logprobs)
