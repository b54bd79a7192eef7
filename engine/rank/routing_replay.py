"""Rollout routing replay on a rank (SamplingParams.forced_routed_experts; moe/routing_replay.py): the given expert
ids of a step's rows, as one [L, T, K] tensor for the MoE layers.

Legend: T the step's tokens, L MoE layers, K top-k, n the positions a request gives.

A request gives ids for its first n prompt positions ([n, L, K], n <= its prompt; a row of -1: its router's
choice). A step's rows are positions of their requests: row i of request s is position num_computed_tokens + i, so
a chunked prefill takes the rows its chunk covers, and a recompute after a preemption takes them again. Positions
past n (later prompt tokens, generated ones) route on their own.
"""
from __future__ import annotations

import numpy as np
import torch


def plan(states: list, query_lens: list[int], qsl_S1: np.ndarray, num_layers: int, top_k: int
         ) -> np.ndarray | None:
    """int32 [T, L, K] of the step (before num_computed_tokens moves on), -1 where nothing is given; None when no
    row of the step is given."""
    forced = None
    for s, (st, n) in enumerate(zip(states, query_lens)):
        given = getattr(st.params, "forced_routed_experts", None)
        if given is None or n == 0 or st.num_computed_tokens >= len(given):
            continue
        if forced is None:
            forced = np.full((int(qsl_S1[-1]), num_layers, top_k), -1, dtype=np.int32)
        first = st.num_computed_tokens
        stop = min(first + n, len(given))
        row = int(qsl_S1[s])
        forced[row: row + stop - first] = given[first:stop]
    return forced


def to_device(forced_TLK: np.ndarray, device: torch.device) -> torch.Tensor:
    """[L, T, K] int32 on the device, each layer's rows contiguous (the layers take theirs in turn)."""
    return torch.from_numpy(np.ascontiguousarray(forced_TLK.transpose(1, 0, 2))).to(device, non_blocking=True)
