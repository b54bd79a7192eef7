"""Logprobs as they cross from the device to the host: one float32 row per token, packed on the device (the sampler's
sampled tokens, engine/rank/sampler.py; a prompt's positions, engine/prompt_logprobs/scoring.py; a verify step's,
engine/spec/verify.py) and unpacked on the host into the scheduler's TokenLogprobs."""
from __future__ import annotations

from typing import Optional

import torch

from moelink.scheduler.outputs import TokenLogprobs


def pack_token_logprobs(logprobs_LV: torch.Tensor, tokens_L: torch.Tensor, N: int) -> torch.Tensor:
    """float32 [L, 3 + 2N]: per row the token's id, logprob and rank, then the top-N ids and logprobs (ids and ranks
    < 2**24 are exact in float32), so they cross to the host in one transfer. The token: the sampled one, or the
    prompt token a position predicts (engine/prompt_logprobs/scoring.py)."""
    tok_L1 = tokens_L.unsqueeze(1)
    tok_lp_L1 = logprobs_LV.gather(1, tok_L1)
    # Rank 1 = best; ties with the token count in its favour.
    rank_L1 = (logprobs_LV > tok_lp_L1).sum(dim=-1, keepdim=True) + 1
    top_lp_LN, top_id_LN = logprobs_LV.topk(N, dim=-1)  # sorted, best first
    return torch.cat([tok_L1.float(), tok_lp_L1, rank_L1.float(), top_id_LN.float(), top_lp_LN], dim=1)


def unpack_logprobs(packed: list[list[float]], num_logprobs: list[Optional[int]], N: int
                    ) -> list[Optional[TokenLogprobs]]:
    """The host side of `pack_token_logprobs`: one TokenLogprobs per row that asked (None for the others)."""
    out: list[Optional[TokenLogprobs]] = [None] * len(num_logprobs)
    rows = [i for i, n in enumerate(num_logprobs) if n is not None]
    for row, vals in zip(rows, packed):
        n = min(num_logprobs[row], N)
        top = [(int(t), lp) for t, lp in zip(vals[3 : 3 + n], vals[3 + N : 3 + N + n])]
        out[row] = TokenLogprobs(token_id=int(vals[0]), logprob=vals[1], rank=int(vals[2]), top=top)
    return out


__all__ = ["pack_token_logprobs", "unpack_logprobs"]
