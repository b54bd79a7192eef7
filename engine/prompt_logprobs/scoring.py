"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): for each prompt token after the first, its logprob
given the tokens before it, its rank, and the top-n alternatives, from the raw model distribution (as the sampled
tokens' logprobs: engine/rank/sampler.py). What an RL trainer recomputes, and what a client scores a text with.

Legend: P prompt positions scored this step, V vocab, N the largest top-n asked.

A step's flat row for prompt position p predicts token p + 1, so a chunk [a, a + n) of a prompt of length L scores
the prompt tokens a + 1 .. min(a + n, L - 1) (the row of the last prompt token predicts the first generated token:
that is the sampler's). The targets are prompt tokens the host already holds: nothing waits for the device.

`plan` runs on the host before the step moves num_computed_tokens; `score` on the device after the forward, its
logits built in slices of at most SLICE_ROWS rows so that a long prompt never holds [P, V] float32 at once; the
packed rows come back with the step's other results (one transfer), and `unpack` turns them into one
PromptLogprobs per request on the host. The scheduler never gives such a request a prefix-cache or offload hit
(every prompt token has to be computed: scheduler/scheduler.py), as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moelink.scheduler.outputs import PromptLogprobs

from ..contract.logprob_rows import pack_token_logprobs, unpack_logprobs

# Rows of logits scored together: [SLICE_ROWS, V] float32 at a time (256 x 152k vocab: 156 MB).
SLICE_ROWS = 256


@dataclass
class PromptLogprobsPlan:
    """The step's prompt positions to score: their flat rows, target tokens and top-n, grouped by request."""

    rows_P: np.ndarray  # int64 [P]: rows of the step's flat batch
    targets_P: np.ndarray  # int64 [P]: the prompt token each row predicts
    num_P: list[int]  # top-n per row
    max_num: int  # N
    # (request id, first prompt position scored (its index in the prompt), rows of it): in row order
    requests: list[tuple[str, int, int]]


def plan(states: list, query_lens: list[int], qsl_S1: np.ndarray) -> PromptLogprobsPlan | None:
    """The prompt positions this step computes for the requests that asked for prompt logprobs (before
    num_computed_tokens moves on); None when none did."""
    rows: list[np.ndarray] = []
    targets: list[int] = []
    num: list[int] = []
    requests: list[tuple[str, int, int]] = []
    for s, (st, n) in enumerate(zip(states, query_lens)):
        k = st.params.prompt_logprobs
        if k is None:
            continue
        start, prompt = st.num_computed_tokens, st.prompt_token_ids
        stop = min(start + n, len(prompt) - 1)  # rows predicting a prompt token (never the first generated one)
        if stop <= start:
            continue
        rows.append(np.arange(int(qsl_S1[s]), int(qsl_S1[s]) + stop - start, dtype=np.int64))
        targets.extend(prompt[start + 1: stop + 1])
        num.extend([k] * (stop - start))
        requests.append((st.req_id, start + 1, stop - start))
    if not requests:
        return None
    return PromptLogprobsPlan(np.concatenate(rows), np.asarray(targets, dtype=np.int64), num, max(num), requests)


def score(model, h_TD: torch.Tensor, p: PromptLogprobsPlan) -> torch.Tensor:
    """float32 [P, 3 + 2N] on the device (engine/contract/logprob_rows.py), in slices of SLICE_ROWS rows."""
    dev = h_TD.device
    rows_P = torch.from_numpy(p.rows_P).to(dev, non_blocking=True)
    targets_P = torch.from_numpy(p.targets_P).to(dev, non_blocking=True)
    out = []
    for i in range(0, len(p.rows_P), SLICE_ROWS):
        logits_RV = model.compute_logits(h_TD.index_select(0, rows_P[i: i + SLICE_ROWS]))
        logprobs_RV = torch.log_softmax(logits_RV.float(), dim=-1)
        out.append(pack_token_logprobs(logprobs_RV, targets_P[i: i + SLICE_ROWS], p.max_num))
    return out[0] if len(out) == 1 else torch.cat(out)


def unpack(p: PromptLogprobsPlan, packed_PX: torch.Tensor) -> dict[str, PromptLogprobs]:
    """The host side: {request id: its scored positions} (packed_PX already in host memory)."""
    entries = unpack_logprobs(packed_PX.tolist(), list(p.num_P), p.max_num)
    out: dict[str, PromptLogprobs] = {}
    i = 0
    for req_id, first, n in p.requests:
        out[req_id] = PromptLogprobs(first, [e for e in entries[i: i + n] if e is not None])
        i += n
    return out
