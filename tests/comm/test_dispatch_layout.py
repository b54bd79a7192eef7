"""Dispatch / combine on 2 real ranks (gloo) against layouts worked out by hand.

Placement: E=4 experts, contiguous: rank 0 holds experts 0, 1 (local slots
0, 1); rank 1 holds experts 2, 3 (local slots 0, 1). D=2, float64, top-2.

Expert compute is a fake that makes every row traceable: a receiver turns row
x into x · Σ_k w_k · (global expert id of k + 1) over its own entries, so a
token's combined output is x · Σ_k w_k · (id_k + 1) over all its experts.

Inputs (token: expert ids, weights → destination ranks):
  rank 0: x = [1,2], [3,4], [5,6]
    t0: (0, 1) (.75, .25)   → rank 0
    t1: (1, 0) (.5, .5)     → rank 0
    t2: (3, 0) (.625, .375) → ranks 0 (expert 0) and 1 (expert 3): sent twice, not more
  rank 1: x = [7,8], [9,10], [11,12]
    t0: (1, 3) (.5, .5)     → ranks 0 (expert 1) and 1 (expert 3)
    t1: (2, 3) (.25, .75)   → rank 1 (both experts: ONE row)
    t2: (0, 2) (.875, .125) → ranks 0 and 1

Send buffers, "torch" backend (destination rank, then token order):
  rank 0: to r0: t0 t1 t2 | to r1: t2          send_counts [3, 1]
  rank 1: to r0: t0 t2    | to r1: t0 t1 t2    send_counts [2, 3]
Each row carries its token's two ids as the receiver's local slots, -1 (and
weight 0) for the entry that lives elsewhere, e.g. rank 0's t2 → r0 is
ids (-1, 0) w (0, .375) and t2 → r1 is ids (1, -1) w (.625, 0).

Receive buffers (source rank order, then the sender's token order):
  rank 0, recv_counts [3, 2]:
    [1,2]  (0, 1)  (.75, .25)    r0 t0
    [3,4]  (1, 0)  (.5, .5)      r0 t1
    [5,6]  (-1, 0) (0, .375)     r0 t2
    [7,8]  (1, -1) (.5, 0)       r1 t0
    [11,12](0, -1) (.875, 0)     r1 t2
  rank 1, recv_counts [1, 3]:
    [5,6]  (1, -1) (.625, 0)     r0 t2
    [7,8]  (-1, 1) (0, .5)       r1 t0
    [9,10] (0, 1)  (.25, .75)    r1 t1
    [11,12](-1, 0) (0, .125)     r1 t2

Fake expert outputs (factor = Σ w·(id+1); rank 1's slots are experts 2, 3):
  rank 0: 1.25, 1.5, .375, 1, .875 → [1.25,2.5] [4.5,6] [1.875,2.25] [7,8] [9.625,10.5]
  rank 1: 2.5, 2, 3.75, .375       → [12.5,15] [14,16] [33.75,37.5] [4.125,4.5]

Combined (sum of a token's rows): rank 0: t0 [1.25,2.5], t1 [4.5,6],
t2 [1.875+12.5, 2.25+15] = [14.375,17.25] (= [5,6]·2.875); rank 1: t0 [7+14,
8+16] = [21,24], t1 [33.75,37.5], t2 [9.625+4.125, 10.5+4.5] = [13.75,15].

Bytes: a row is 2 · 8 = 16 bytes; rank 0 dispatches 4 rows (64 B) and
combines 5 back (80 B); rank 1 dispatches 5 (80 B) and combines 4 (64 B).
Metadata per row: 2 · (4 id bytes + 8 weight bytes) = 24 B.
"""
from __future__ import annotations

import pytest
import torch

f64 = dict(dtype=torch.float64)

X = [torch.tensor([[1, 2], [3, 4], [5, 6]], **f64), torch.tensor([[7, 8], [9, 10], [11, 12]], **f64)]
IDS = [torch.tensor([[0, 1], [1, 0], [3, 0]]), torch.tensor([[1, 3], [2, 3], [0, 2]])]
W = [torch.tensor([[.75, .25], [.5, .5], [.625, .375]], **f64), torch.tensor([[.5, .5], [.25, .75], [.875, .125]], **f64)]

RECV_X = [torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8], [11, 12]], **f64),
          torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]], **f64)]
RECV_IDS = [torch.tensor([[0, 1], [1, 0], [-1, 0], [1, -1], [0, -1]], dtype=torch.int32),
            torch.tensor([[1, -1], [-1, 1], [0, 1], [-1, 0]], dtype=torch.int32)]
RECV_W = [torch.tensor([[.75, .25], [.5, .5], [0, .375], [.5, 0], [.875, 0]], **f64),
          torch.tensor([[.625, 0], [0, .5], [.25, .75], [0, .125]], **f64)]
Y = [torch.tensor([[1.25, 2.5], [4.5, 6], [1.875, 2.25], [7, 8], [9.625, 10.5]], **f64),
     torch.tensor([[12.5, 15], [14, 16], [33.75, 37.5], [4.125, 4.5]], **f64)]
OUT = [torch.tensor([[1.25, 2.5], [4.5, 6], [14.375, 17.25]], **f64),
       torch.tensor([[21, 24], [33.75, 37.5], [13.75, 15]], **f64)]
SEND_COUNTS = [[3, 1], [2, 3]]
RECV_COUNTS = [[3, 2], [1, 3]]

# Padded layout ("torch_padded", capacity C = 3): blocks of 3 rows per rank pair, padding rows are
# zeros with ids -1 and weights 0; the valid rows are those above, in the same order within a block.
#   rank 0 receives: from r0 [1,2] [3,4] [5,6]   | from r1 [7,8] [11,12] pad
#   rank 1 receives: from r0 [5,6] pad pad       | from r1 [7,8] [9,10] [11,12]
PAD_ROWS = [[0, 1, 2, 3, 4], [0, 3, 4, 5]]  # where the valid rows sit in the 6-row receive buffer

# A rank with no tokens. Rank 0: x = [1,2], [3,4]; t0 (2, 3) (.5, .5) → rank 1 only;
# t1 (0, 2) (.25, .75) → ranks 0 and 1. Rank 1: x of shape [0, 2].
#   rank 0 sends r0: t1 | r1: t0 t1 (send_counts [1, 2]); rank 1 sends nothing ([0, 0]).
#   rank 0 receives [3,4] (0, -1) (.25, 0)                     recv_counts [1, 0]
#   rank 1 receives [1,2] (0, 1) (.5, .5); [3,4] (-1, 0) (0, .75)  recv_counts [2, 0]
#   y: rank 0 [.75, 1]; rank 1 [3.5, 7], [6.75, 9]
#   out: rank 0 t0 [3.5, 7], t1 [.75 + 6.75, 1 + 9] = [7.5, 10] (= [3,4]·2.5); rank 1: [0, 2]
EMPTY_X = [torch.tensor([[1, 2], [3, 4]], **f64), torch.zeros(0, 2, **f64)]
EMPTY_IDS = [torch.tensor([[2, 3], [0, 2]]), torch.zeros(0, 2, dtype=torch.long)]
EMPTY_W = [torch.tensor([[.5, .5], [.25, .75]], **f64), torch.zeros(0, 2, **f64)]


def _scenario(name, backend, x, ids, w, **options):
    return dict(name=name, backend=backend, options=options, placement=dict(num_experts=4, ep_size=2),
                x=x, ids=ids, weights=w, compute="fake")


@pytest.fixture(scope="module")
def results(ep_launch):
    (per_rank,) = ep_launch(dict(world_size=2, scenarios=[
        _scenario("torch", "torch", X, IDS, W),
        _scenario("padded", "torch_padded", X, IDS, W, max_tokens_per_rank=3),
        _scenario("torch_empty", "torch", EMPTY_X, EMPTY_IDS, EMPTY_W),
        _scenario("padded_empty", "torch_padded", EMPTY_X, EMPTY_IDS, EMPTY_W, max_tokens_per_rank=2),
    ]))
    return per_rank


@pytest.mark.parametrize("rank", [0, 1])
def test_torch_backend_layout(results, rank):
    r = results[rank]["torch"]
    assert r["send_counts_list"] == SEND_COUNTS[rank] and r["recv_counts_list"] == RECV_COUNTS[rank]
    assert r["send_counts"] == SEND_COUNTS[rank] and r["recv_counts"] == RECV_COUNTS[rank]
    assert torch.equal(r["recv_x"], RECV_X[rank])
    assert r["recv_ids"].dtype == torch.int32 and torch.equal(r["recv_ids"], RECV_IDS[rank])
    assert torch.equal(r["recv_weights"], RECV_W[rank])
    assert torch.equal(r["y"], Y[rank])
    assert torch.equal(r["out"], OUT[rank])
    sent, received = sum(SEND_COUNTS[rank]), sum(RECV_COUNTS[rank])
    assert r["num_tokens_sent"] == sent and r["num_tokens_received"] == received
    assert r["bytes_dispatched"] == sent * 16 and r["bytes_combined"] == received * 16
    assert r["bytes_metadata"] == sent * 24


@pytest.mark.parametrize("rank", [0, 1])
def test_padded_backend_layout(results, rank):
    r = results[rank]["padded"]
    rows = torch.tensor(PAD_ROWS[rank])
    pad = torch.ones(6, dtype=torch.bool)
    pad[rows] = False
    assert r["recv_x"].shape == (6, 2)
    assert torch.equal(r["recv_x"][rows], RECV_X[rank]) and not r["recv_x"][pad].any()
    assert torch.equal(r["recv_ids"][rows], RECV_IDS[rank]) and (r["recv_ids"][pad] == -1).all()
    assert torch.equal(r["recv_weights"][rows], RECV_W[rank]) and not r["recv_weights"][pad].any()
    assert torch.equal(r["out"], OUT[rank])
    # No host sync inside dispatch: the lists stay unset; the counters read the device counts.
    assert r["send_counts_list"] is None and r["recv_counts_list"] is None
    assert r["send_counts"] == SEND_COUNTS[rank] and r["recv_counts"] == RECV_COUNTS[rank]
    assert r["bytes_dispatched"] == sum(SEND_COUNTS[rank]) * 16
    assert r["bytes_combined"] == sum(RECV_COUNTS[rank]) * 16


@pytest.mark.parametrize("backend", ["torch_empty", "padded_empty"])
def test_rank_with_no_tokens_still_serves_its_experts(results, backend):
    r0, r1 = results[0][backend], results[1][backend]
    assert r0["send_counts"] == [1, 2] and r0["recv_counts"] == [1, 0]
    assert r1["send_counts"] == [0, 0] and r1["recv_counts"] == [2, 0]
    if backend == "torch_empty":
        assert torch.equal(r0["recv_x"], torch.tensor([[3, 4]], **f64))
        assert torch.equal(r0["recv_ids"], torch.tensor([[0, -1]], dtype=torch.int32))
        assert torch.equal(r1["recv_x"], torch.tensor([[1, 2], [3, 4]], **f64))
        assert torch.equal(r1["recv_ids"], torch.tensor([[0, 1], [-1, 0]], dtype=torch.int32))
        assert torch.equal(r1["recv_weights"], torch.tensor([[.5, .5], [0, .75]], **f64))
    assert torch.equal(r0["out"], torch.tensor([[3.5, 7], [7.5, 10]], **f64))
    assert r1["out"].shape == (0, 2)
    assert r1["bytes_dispatched"] == 0 and r1["bytes_combined"] == 2 * 16
