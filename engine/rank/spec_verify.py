"""A verify step's sampling (speculative decoding): the rows that verify drafts go through the acceptance rule,
the others through the sampler as in any step.

Legend: R rows that sample this step (one per request, in the step's order), B verified positions (the drafts'
positions and the one after, per verifying row), V vocab, K the most drafts of a row.

A request that verifies k drafts computed its last known token and the k drafts: its last k + 1 positions in the
flat batch give the target's logits for each draft and for the token after them. Those rows get the same
processors as a plain sampled row (temperature, min-p, top-k, top-p, greedy; seeds), expanded to every position,
and engine/rank/rejection_sampler.py picks what the request emits. Requests that verify nothing (no drafts, or
processors the drafter left alone: engine/rank/drafter.py `may_draft`) are sampled by `Sampler` with their own
metadata, penalties, logprobs and grammar masks included. Nothing here waits for the device: the emitted tokens
go to host memory by non-blocking copies, read when the step is collected (engine/rank/step_handle.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .device_stream import to_device, to_host
from .rejection_sampler import DraftRows, rejection_sample
from .sampler import processed_probs
from .sampling_metadata import SamplingMetadata


@dataclass
class _Expanded:
    """A SamplingMetadata's random-row processors repeated per verified position (what processed_probs reads)."""

    temperature_B: torch.Tensor
    min_p_B: Optional[torch.Tensor]
    top_k_B: Optional[torch.Tensor]
    top_p_B: Optional[torch.Tensor]
    max_top_k: int


class SpecStep:
    """Host-side plan of a verify step's sampling, and its device half (`run`)."""

    def __init__(self, batch, rows_S: np.ndarray, sample_rows: list[int], qsl_S1: np.ndarray, picked: list,
                 spec_tokens: dict[str, list[int]], eos_token_ids, device: torch.device,
                 bitmasks: Optional[dict[str, bytes]], num_pending: list[int]):
        self.device = device
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
        self.meta_plain = None
        if self.plain_rows:
            plain = [picked[r] for r in self.plain_rows]
            self.meta_plain = SamplingMetadata.from_batch(
                batch, rows_R[self.plain_rows], plain, eos_token_ids, device,
                [bitmasks.get(st.req_id) for st in plain] if bitmasks else None,
                [num_pending[r] for r in self.plain_rows])

    def run(self, model, sampler, h_TD: torch.Tensor) -> "SpecResult":
        """The device half: logits of the verified positions, the acceptance rule, the plain rows' sampling."""
        dev = self.device
        res = SpecResult(self.num_rows, self.verify_rows, self.plain_rows)
        logits_BV = model.compute_logits(h_TD.index_select(0, to_device(self.verify_logit_rows, torch.long, dev)))
        meta = self.meta_verify
        rows = DraftRows(tuple(self.num_draft))
        if meta.all_greedy:
            probs_BV = logits_BV.float()  # only the argmax is read on greedy rows
            greedy_R = torch.ones(rows.num_requests, dtype=torch.bool, device=dev)
        else:
            reps = torch.tensor([k + 1 for k in self.num_draft], device=dev)
            probs_BV = processed_probs(logits_BV.to(torch.float32, copy=True), _expand(meta, reps))
            greedy_R = (meta.greedy_mask_B if meta.greedy_mask_B is not None
                        else torch.zeros(rows.num_requests, dtype=torch.bool, device=dev))
        out = rejection_sample(probs_BV, rows, to_device(self.draft_ids_D, torch.long, dev), None, greedy_R,
                               meta.generators)
        res.verify_ids_RK1 = to_host(out.token_ids_RK1)
        res.verify_counts_R = to_host(out.num_tokens_R)
        res.emitted_R = out.num_tokens_R
        last_V = out.token_ids_RK1.gather(1, (out.num_tokens_R - 1).unsqueeze(1)).squeeze(1)
        sampled_R = torch.empty(self.num_rows, dtype=torch.long, device=dev)
        sampled_R[to_device(np.asarray(self.verify_rows), torch.long, dev)] = last_V
        if self.plain_rows:
            plain_logits = model.compute_logits(
                h_TD.index_select(0, to_device(self.plain_logit_rows, torch.long, dev)))
            result = sampler(plain_logits, self.meta_plain)
            self.meta_plain.record_penalised(result.token_ids_B)
            sampled_R[to_device(np.asarray(self.plain_rows), torch.long, dev)] = result.token_ids_B
            res.plain_ids = to_host(result.token_ids_B)
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
    verify_ids_RK1: Optional[torch.Tensor] = None  # long [R_verify, K + 1], -1 past each row's tokens
    verify_counts_R: Optional[torch.Tensor] = None  # long [R_verify]
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


def _expand(meta: SamplingMetadata, reps: torch.Tensor) -> _Expanded:
    def rep(t):
        return None if t is None else t.repeat_interleave(reps)
    return _Expanded(rep(meta.temperature_B), rep(meta.min_p_B), rep(meta.top_k_B), rep(meta.top_p_B),
                     meta.max_top_k)
