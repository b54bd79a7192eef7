"""One rank of tests/comm/test_tensor_parallel.py's gloo world of 4 (two TP groups of 2): runs each collective of
engine/tp/group.py and saves what it got to OUT/rank{r}.pt.

    python -m tests.helpers.tp_group_worker RANK PORT OUT

Started through the test zygote (tests/helpers/zygote.py: forked with torch already imported, else exec'd)."""
from __future__ import annotations

import sys

import torch


def run_rank(rank: int, port: int, out: str) -> None:
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
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
