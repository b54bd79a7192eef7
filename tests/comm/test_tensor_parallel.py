"""engine/tp/group.py over real gloo process groups: a world of 4 ranks in two TP groups of 2 ({0, 1}, {2, 3}),
each collective checked against the values worked out by hand; token_rows and tp_group_ranks without a group."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moelink.engine.tp.group import TensorParallel, tp_group_ranks

from tests.helpers import zygote


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


@pytest.mark.slow  # four processes
def test_collectives_over_two_groups_of_two(tmp_path):
    from moelink.comm import find_free_port

    port = find_free_port("127.0.0.1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    procs = []
    try:
        for r in range(4):  # forked by the test zygote (torch imported once), else exec'd: tests/helpers/zygote.py
            procs.append(zygote.popen([sys.executable, "-m", "tests.helpers.tp_group_worker", str(r), str(port),
                                       str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env))
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [p.stdout.read().decode(errors="replace")[-2000:] for p in procs]
    for p in procs:
        p.stdout.close()
    assert codes == [0, 0, 0, 0], logs
    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)}
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
