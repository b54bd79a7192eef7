"""Rollout routing replay on a rank (`--enable-return-routed-experts`, SamplingParams.return_routed_experts): which
rows of a step belong to the requests that asked, and their routed expert ids (moe/routing_capture.py) back to the
host with the step's other results.

Legend: P rows of asking requests this step, L MoE layers, K top-k.

Every row a step forwards is a position of its request (prompt tokens, generated tokens fed back, a verify step's
drafts); the scheduler keeps each request's rows by position (a later step's rows for the same positions, after a
preemption or rejected drafts, replace them) and the output carries positions 0 .. prompt + generated - 2, the
positions the model forwarded. Such a request computes its whole prompt (no prefix-cache or KV-load hit: the
routing of KV it did not compute is not kept), as a prompt-logprobs request does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moelink.scheduler.outputs import RoutedExperts


@dataclass
class RoutedExpertsPlan:
    rows_P: np.ndarray  # int64 [P]: rows of the step's flat batch
    requests: list[tuple[str, int, int]]  # (request id, position of its first row, rows): in row order


def plan(states: list, query_lens: list[int], qsl_S1: np.ndarray) -> RoutedExpertsPlan | None:
    """The rows of the requests that asked (before num_computed_tokens moves on); None when none did."""
    rows, requests = [], []
    for s, (st, n) in enumerate(zip(states, query_lens)):
        if not st.params.return_routed_experts or n == 0:
            continue
        rows.append(np.arange(int(qsl_S1[s]), int(qsl_S1[s]) + n, dtype=np.int64))
        requests.append((st.req_id, st.num_computed_tokens, n))
    if not requests:
        return None
    return RoutedExpertsPlan(np.concatenate(rows), requests)


def gather(capture, p: RoutedExpertsPlan, device: torch.device) -> torch.Tensor:
    """int32 [P, L, K] on the device: the plan's rows of the step's capture."""
    return capture.rows(torch.from_numpy(p.rows_P).to(device, non_blocking=True))


def unpack(p: RoutedExpertsPlan, ids_PLK: torch.Tensor) -> dict[str, RoutedExperts]:
    """The host side: {request id: its rows} (ids_PLK already in host memory)."""
    arr = ids_PLK.numpy()
    out, i = {}, 0
    for req_id, first, n in p.requests:
        out[req_id] = RoutedExperts(first, arr[i: i + n].astype(np.int16 if arr.max(initial=0) < 2 ** 15 else np.int32))
        i += n
    return out
