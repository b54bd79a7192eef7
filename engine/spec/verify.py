"""A verify step's sampling (speculative decoding): the rows that verify drafts go through the acceptance rule,
the others through the sampler as in any step.

Legend: R rows that sample this step (one per request, in the step's order), B verified positions (the drafts'
positions and the one after, per verifying row), V vocab, K the most drafts of a row.

A request that verifies k drafts computed its last known token and the k drafts: its last k + 1 positions in the
flat batch give the target's logits for each draft and for the token after them. Those rows get the same
processors as a plain sampled row (temperature, min-p, top-k, top-p, greedy; seeds), expanded to every position,
and engine/spec/rejection.py picks what the request emits. Requests that verify nothing (no drafts, or
processors the drafter left alone: engine/spec/proposer/__init__.py `may_draft`) are sampled by `Sampler` with their own
metadata, penalties, logprobs and grammar masks included. Nothing here waits for the device: the emitted tokens
go to host memory by non-blocking copies, read when the step is collected (engine/rank/step_handle.py).

Under tensor parallelism every rank of a TP group runs the verify step on the same gathered logits, but a random
draw (the acceptance test's uniforms, the recovered or bonus token, a plain row's sample) is each rank's own
unless seeded. So the group's first rank's emitted tokens, counts and plain tokens are everyone's: one broadcast
of them packed (engine/tp/group.TensorParallel.broadcast_first_packed), before anything reads them
(penalty counts, logprobs, the next step's inputs, a device drafter's catch-up), as a plain step's sampled
tokens are broadcast (engine/rank/model_runner.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..contract.spec_decoding import DraftRequest, LogitsModel, SamplingBatch
from ..contract.host_copy import to_device, to_host
from .rejection import DraftRows, rejection_sample
from ..rank.sampler import Sampler, apply_penalties, processed_probs
from ..rank.sampling_metadata import SamplingMetadata, unpack_bitmasks
from ..tp.group import TensorParallel


@dataclass
class _Expanded:
    """A SamplingMetadata's random-row processors repeated per verified position (what processed_probs reads)."""

    temperature_B: torch.Tensor
    min_p_B: Optional[torch.Tensor]
    top_k_B: Optional[torch.Tensor]
    top_p_B: Optional[torch.Tensor]
    max_top_k: int


class SpecStep:
    """Host-side plan of a verify step's sampling, and its device half (`run`): a VerifyStep
    (engine/contract/spec_decoding.py). `sampler`: what samples the plain rows (the rank's Sampler, stateless)."""

    def __init__(self, batch: SamplingBatch, rows_S: np.ndarray, sample_rows: list[int], qsl_S1: np.ndarray,
                 picked: Sequence[DraftRequest], spec_tokens: Mapping[str, list[int]], eos_token_ids: set[int],
                 device: torch.device, bitmasks: Optional[Mapping[str, bytes]], num_pending: list[int],
                 sampler: Sampler | None = None):
        self.device = device
        self.sampler = sampler if sampler is not None else Sampler()
        self.num_rows = len(picked)
        drafts = [spec_tokens.get(st.req_id) or [] for st in picked]
        self.verify_rows = [r for r, d in enumerate(drafts) if d]
        self.plain_rows = [r for r, d in enumerate(drafts) if not d]
        self.num_draft = [len(drafts[r]) for r in self.verify_rows]
        self.draft_ids_D = np.fromiter((t for r in self.verify_rows for t in drafts[r]), dtype=np.int64)
        last_R = qsl_S1[1:][sample_rows] - 1
        # Flat positions of each verifying row's k + 1 verified tokens, in order; and each plain row's last token.
        self.verify_logit_rows = np.concatenate(
            [np.arange(last_R[r] - k, last_R[r] + 1) for r, k in zip(self.verify_rows, self.num_draft)])
        self.plain_logit_rows = last_R[self.plain_rows]
        rows_R = rows_S[sample_rows]
        self.meta_verify = SamplingMetadata.from_batch(
            batch, rows_R[self.verify_rows], [picked[r] for r in self.verify_rows], eos_token_ids, device,
            None, [num_pending[r] for r in self.verify_rows])
        # Grammar masks, one per verified position (engine/core/structured_output.py: k + 1 back to back).
        self.position_masks = None
        if bitmasks and any(picked[r].req_id in bitmasks for r in self.verify_rows):
            self.position_masks = _position_masks(
                [bitmasks.get(picked[r].req_id) for r in self.verify_rows], self.num_draft)
        # Penalties at position j of a verifying row count its drafts before j too: (position row, draft) pairs.
        self.prefix_pairs = None
        if not self.meta_verify.no_penalties:
            self.prefix_pairs = prefix_draft_pairs([drafts[r] for r in self.verify_rows])
        self.meta_plain = None
        if self.plain_rows:
            plain = [picked[r] for r in self.plain_rows]
            self.meta_plain = SamplingMetadata.from_batch(
                batch, rows_R[self.plain_rows], plain, eos_token_ids, device,
                [bitmasks.get(st.req_id) for st in plain] if bitmasks else None,
                [num_pending[r] for r in self.plain_rows])

    def run(self, model: LogitsModel, h_TD: torch.Tensor, tp: TensorParallel | None = None) -> "SpecResult":
        """The device half: logits of the verified positions, the acceptance rule, the plain rows' sampling.
        `tp`: the rank's TensorParallel (None: no TP): the group's first rank's tokens are taken (module docstring)."""
        dev = self.device
        res = SpecResult(self.num_rows, self.verify_rows, self.plain_rows, self.num_draft)
        logits_BV = model.compute_logits(h_TD.index_select(0, to_device(self.verify_logit_rows, torch.long, dev)))
        meta = self.meta_verify
        rows = DraftRows(tuple(self.num_draft))
        reps = torch.tensor([k + 1 for k in self.num_draft], device=dev)
        # The grammar's mask first, then logprobs of that raw distribution, as for plain rows (sampler.py's order).
        if self.position_masks is not None:
            allowed_BV = unpack_bitmasks(self.position_masks, logits_BV.shape[1], dev)
            logits_BV = logits_BV.to(torch.float32).masked_fill(~allowed_BV, float("-inf"))
        logprobs_BV = None if meta.no_logprobs else torch.log_softmax(logits_BV.float(), dim=-1)
        if not meta.no_penalties:
            logits_BV = logits_BV.to(torch.float32, copy=True)
            apply_penalties(logits_BV, PositionPenalties(meta, reps, self.prefix_pairs, dev))
        if meta.all_greedy:
            probs_BV = logits_BV.float()  # only the argmax is read on greedy rows
            greedy_R = torch.ones(rows.num_requests, dtype=torch.bool, device=dev)
        else:
            probs_BV = processed_probs(logits_BV.to(torch.float32, copy=True), _expand(meta, reps))
            greedy_R = (meta.greedy_mask_B if meta.greedy_mask_B is not None
                        else torch.zeros(rows.num_requests, dtype=torch.bool, device=dev))
        out = rejection_sample(probs_BV, rows, to_device(self.draft_ids_D, torch.long, dev), None, greedy_R,
                               meta.generators)
        ids_RK1, counts_R = out.token_ids_RK1, out.num_tokens_R
        result = plain_B = None
        if self.plain_rows:  # sampled before anything reads the tokens: one broadcast carries both kinds under TP
            plain_logits = model.compute_logits(
                h_TD.index_select(0, to_device(self.plain_logit_rows, torch.long, dev)))
            result = self.sampler(plain_logits, self.meta_plain)
            plain_B = result.token_ids_B
        if tp is not None:
            if plain_B is None:
                ids_RK1, counts_R = tp.broadcast_first_packed(ids_RK1, counts_R)
            else:
                ids_RK1, counts_R, plain_B = tp.broadcast_first_packed(ids_RK1, counts_R, plain_B)
        res.verify_ids_RK1 = to_host(ids_RK1)
        res.verify_counts_R = to_host(counts_R)
        res.emitted_R = counts_R
        if meta.penalised_rows_Q is not None:
            _record_emitted(meta, ids_RK1)
        if logprobs_BV is not None:
            res.verify_logprobs = (to_host(_pack_position_logprobs(logprobs_BV, ids_RK1, self.num_draft,
                                                                   meta)), meta.max_num_logprobs)
        last_V = ids_RK1.gather(1, (counts_R - 1).unsqueeze(1)).squeeze(1)
        sampled_R = torch.empty(self.num_rows, dtype=torch.long, device=dev)
        sampled_R[to_device(np.asarray(self.verify_rows), torch.long, dev)] = last_V
        if self.plain_rows:
            self.meta_plain.record_penalised(plain_B)
            sampled_R[to_device(np.asarray(self.plain_rows), torch.long, dev)] = plain_B
            res.plain_ids = to_host(plain_B)
            if result.logprobs_packed_LX is not None:
                res.plain_logprobs = (to_host(result.logprobs_packed_LX), result.num_logprobs,
                                      result.max_num_logprobs)
        res.sampled_R = sampled_R
        return res


@dataclass
class SpecResult:
    """What a verify step's sampling leaves, in host memory once the step's device work is waited for."""

    num_rows: int
    verify_rows: list[int]
    plain_rows: list[int]
    num_draft: list[int]  # per verifying row
    verify_ids_RK1: Optional[torch.Tensor] = None  # long [R_verify, K + 1], -1 past each row's tokens
    verify_counts_R: Optional[torch.Tensor] = None  # long [R_verify]
    # (packed [B, 3 + 2N] per verified position, N) for the verifying rows that asked for logprobs; None if none.
    verify_logprobs: Optional[tuple] = None
    plain_ids: Optional[torch.Tensor] = None  # long [R_plain]
    plain_logprobs: Optional[tuple] = None  # (packed [L, X], num_logprobs, max) of the plain rows
    sampled_R: Optional[torch.Tensor] = None  # device: each row's last emitted token
    emitted_R: Optional[torch.Tensor] = None  # device, long [R_verify]: tokens each verifying row emits (a device drafter reads it)

    def token_lists(self) -> list[list[int]]:
        """Per sampling row (the step's order), the tokens it emits (host memory: no device sync)."""
        out: list[list[int]] = [[] for _ in range(self.num_rows)]
        ids, counts = self.verify_ids_RK1.tolist(), self.verify_counts_R.tolist()
        for r, row, n in zip(self.verify_rows, ids, counts):
            out[r] = row[:n]
        if self.plain_rows:
            for r, t in zip(self.plain_rows, self.plain_ids.tolist()):
                out[r] = [t]
        return out


def _position_masks(masks: list[Optional[bytes]], num_draft: list[int]) -> list[Optional[bytes]]:
    """Each verifying row's k + 1 masks (back to back in one bytes object, or None: unconstrained) as one entry
    per verified position."""
    out: list[Optional[bytes]] = []
    for m, k in zip(masks, num_draft):
        if m is None:
            out.extend([None] * (k + 1))
            continue
        size = len(m) // (k + 1)
        out.extend(m[i * size: (i + 1) * size] for i in range(k + 1))
    return out


def prefix_draft_pairs(drafts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(position row, token) for each draft before each verified position: rows are the verified positions of
    the verifying rows in order (k + 1 each), and position j of a row counts its drafts 0 .. j-1."""
    pos_rows: list[int] = []
    toks: list[int] = []
    base = 0
    for d in drafts:
        for j in range(1, len(d) + 1):
            pos_rows.extend([base + j] * j)
            toks.extend(d[:j])
        base += len(d) + 1
    return np.asarray(pos_rows, dtype=np.int64), np.asarray(toks, dtype=np.int64)


class PositionPenalties:
    """A verifying rows' SamplingMetadata's penalties at every verified position (sampler.apply_penalties reads
    it): each position's output counts are its row's plus the drafts before it."""

    def __init__(self, meta: SamplingMetadata, reps: torch.Tensor, prefix_pairs, device: torch.device):
        self.meta, self.reps, self.prefix_pairs, self.device = meta, reps, prefix_pairs, device
        self.repetition_penalty_B = meta.repetition_penalty_B.repeat_interleave(reps)
        self.frequency_penalty_B = meta.frequency_penalty_B.repeat_interleave(reps)
        self.presence_penalty_B = meta.presence_penalty_B.repeat_interleave(reps)

    def penalty_tensors(self):
        counts_RV, seen_RV = self.meta.penalty_tensors()
        counts_BV = counts_RV.repeat_interleave(self.reps, dim=0)
        rows_P, toks_P = self.prefix_pairs
        if len(rows_P):
            rows_t, toks_t = to_device(rows_P, torch.long, self.device), to_device(toks_P, torch.long, self.device)
            counts_BV.index_put_((rows_t, toks_t), torch.ones(len(rows_P), device=self.device), accumulate=True)
        seen_BV = None
        if seen_RV is not None:
            seen_BV = seen_RV.repeat_interleave(self.reps, dim=0) | (counts_BV > 0)
        return counts_BV, seen_BV


def _record_emitted(meta: SamplingMetadata, token_ids_RK1: torch.Tensor) -> None:
    """Count every token a penalised verifying row emitted (the accepted drafts and the one after) in the
    persistent batch's device counts: padding (-1) and unpenalised rows add 0. No host sync."""
    R, K1 = token_ids_RK1.shape
    slots_RK = meta.penalty_slots_B.unsqueeze(1).expand(R, K1)
    penalised_R = torch.zeros(R, dtype=torch.bool, device=token_ids_RK1.device)
    penalised_R[meta.penalised_rows_Q] = True
    weight_RK = ((token_ids_RK1 >= 0) & penalised_R.unsqueeze(1)).float()
    meta.penalty_counts.output_counts_PV.index_put_((slots_RK, token_ids_RK1.clamp(min=0)), weight_RK,
                                                     accumulate=True)


def _pack_position_logprobs(logprobs_BV: torch.Tensor, token_ids_RK1: torch.Tensor, num_draft: list[int],
                            meta: SamplingMetadata) -> torch.Tensor:
    """Per verified position, the logprob of the token emitted there (past a row's last token: of its padding,
    never read), its rank and the top N, packed as sampler._pack_logprobs packs a plain row's."""
    dev = logprobs_BV.device
    row_B = torch.repeat_interleave(torch.arange(len(num_draft), device=dev),
                                    torch.tensor([k + 1 for k in num_draft], device=dev))
    first_B = torch.repeat_interleave(torch.tensor(np.cumsum([0] + [k + 1 for k in num_draft[:-1]]), device=dev),
                                      torch.tensor([k + 1 for k in num_draft], device=dev))
    col_B = torch.arange(logprobs_BV.shape[0], device=dev) - first_B
    tok_B = token_ids_RK1[row_B, col_B].clamp(min=0)
    tok_lp_B1 = logprobs_BV.gather(1, tok_B.unsqueeze(1))
    rank_B1 = (logprobs_BV > tok_lp_B1).sum(dim=-1, keepdim=True) + 1
    top_lp, top_id = logprobs_BV.topk(max(meta.max_num_logprobs, 1), dim=-1)
    return torch.cat([tok_B.unsqueeze(1).float(), tok_lp_B1, rank_B1.float(), top_id.float(), top_lp], dim=1)


def _expand(meta: SamplingMetadata, reps: torch.Tensor) -> _Expanded:
    def rep(t):
        return None if t is None else t.repeat_interleave(reps)
    return _Expanded(rep(meta.temperature_B), rep(meta.min_p_B), rep(meta.top_k_B), rep(meta.top_p_B),
                     meta.max_top_k)
