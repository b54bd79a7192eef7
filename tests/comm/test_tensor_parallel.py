"""engine/tp/group.py over real gloo process groups: a world of 4 ranks in two TP groups of 2 ({0, 1}, {2, 3}),
each collective checked against the values worked out by hand; token_rows and tp_group_ranks without a group."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from moelink.engine.tp.group import TensorParallel, tp_group_ranks


def test_token_rows_and_groups_by_hand():
    # T = 5 over 2 ranks: ceil(5/2) = 3 rows, then 2; T = 1: rank 1 gets none (and still joins the all-gather).
    tp = [TensorParallel.__new__(TensorParallel) for _ in range(2)]
    for r, t in enumerate(tp):
        t.rank, t.size = r, 2
    assert [t.token_rows(5) for t in tp] == [(0, 3), (3, 5)]
    assert [t.token_rows(1) for t in tp] == [(0, 1), (1, 1)]
    assert [t.token_rows(0) for t in tp] == [(0, 0), (0, 0)]
    assert tp_group_ranks(4, 2) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the world of 4 ranks"):
        tp_group_ranks(4, 3)
    with pytest.raises(ValueError, match="needs its process group"):
        TensorParallel(0, 2)


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from moelink.comm.process_group import init_process_group
    from moelink.engine.tp.group import make_tp_group

    torch.set_num_threads(1)
    init_process_group(rank, 4, "127.0.0.1", port, "gloo", 30.0)
    tp = make_tp_group(rank, 4, 2)
    g = rank // 2  # group index
    got = {"tp_rank": tp.rank, "ranks": tp.ranks}
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    got["all_reduce"] = tp.all_reduce(x.clone())  # group {0,1}: 1 + 2 = 3; {2,3}: 3 + 4 = 7
    got["gather_last"] = tp.all_gather_last(torch.tensor([[10.0 * rank, 10.0 * rank + 1]]))
    lo, hi = tp.token_rows(3)  # rank 0 of a group rows [0, 2), rank 1 row [2, 3)
    rows = torch.arange(3, dtype=torch.float64)[lo:hi, None] + 100 * g
    got["gather_rows"] = tp.gather_rows(rows, 3)
    tokens = torch.tensor([rank, rank], dtype=torch.int64)
    got["broadcast"] = tp.broadcast_first(tokens)  # every rank of a group: its first rank's
    got["bytes"] = (tp.all_reduce_bytes, tp.all_gather_bytes)
    out.put((rank, got))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # four processes
def test_collectives_over_two_groups_of_two():
    from moelink.comm import find_free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port("127.0.0.1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=60) for _ in range(4))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, got in results.items():
        g, r = divmod(rank, 2)
        assert got["tp_rank"] == r and got["ranks"] == (2 * g, 2 * g + 1)
        assert torch.equal(got["all_reduce"], torch.full((2, 3), 3.0 if g == 0 else 7.0, dtype=torch.float64))
        a, b = 2 * g, 2 * g + 1
        assert got["gather_last"].tolist() == [[10.0 * a, 10.0 * a + 1, 10.0 * b, 10.0 * b + 1]]
        assert got["gather_rows"][:, 0].tolist() == [100.0 * g, 100.0 * g + 1, 100.0 * g + 2]
        assert got["broadcast"].tolist() == [a, a]
        # sent per rank: 48 bytes all-reduced ([2, 3] float64); all-gathers: 8 bytes of logits ([1, 2] float32)
        # + the token slice padded to ceil(3 / 2) = 2 rows of one float64
        assert got["bytes"] == (48, 24)
