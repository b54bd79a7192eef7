"""The dispatch's packed routing rows (comm/a2a_base.pack_meta / unpack_meta): ids and weights of any top-k as one
uint8 row each, round trip exact; a top-1 rank that sends no rows (its ids [0, 1] strided (1, 0) by torch.where,
which contiguous() keeps) packs to an empty [0, 8] tensor rather than failing the byte view (Llama 4's top-1 experts
under expert parallelism, a rank with no tokens)."""
from __future__ import annotations

import pytest
import torch

from moelink.comm.a2a_base import pack_meta, unpack_meta


@pytest.mark.parametrize("S,K", [(0, 1), (1, 1), (3, 1), (0, 2), (4, 3)])
def test_round_trip(S, K):
    ids = torch.randint(-1, 9, (S, K), dtype=torch.int64)
    weights = torch.rand(S, K, dtype=torch.float32)
    if S == 0:  # as the dispatch builds them for a rank that sends nothing
        here = torch.zeros(0, 1, dtype=torch.bool)
        ids = torch.where(here, ids.to(torch.int32), -1)
    packed = pack_meta(ids, weights)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (S, K * 8)
    got_ids, got_w = unpack_meta(packed, K, torch.float32)
    assert torch.equal(got_ids.long(), ids.long()) and torch.equal(got_w, weights)
