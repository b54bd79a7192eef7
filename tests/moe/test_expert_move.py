"""Online EPLB's weight move (moe/expert_move.py): the plan on paper, then real gloo ranks moving two MoE
layers' experts to EPLB's placement in chunks, serving between chunks, outputs unchanged after the switch."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moelink.moe.expert_move import Transfer, plan_moves
from moelink.moe.placement import ExpertPlacement
from tests.helpers import zygote

ROOT = Path(__file__).resolve().parents[2]


def test_plan_moves_keeps_local_copies_and_spreads_senders():
    old = ExpertPlacement(num_experts=4, ep_size=2, layout=[[0, 1, 2], [2, 3, 0]])
    new = ExpertPlacement(num_experts=4, ep_size=2, layout=[[0, 2, 3], [1, 3, 0]])
    moves = plan_moves([old], [new])
    assert moves == [Transfer(0, 0, 2, 0, 1),  # rank 0 slot 1 <- its own expert 2 (slot 2): local copy
                     Transfer(0, 1, 1, 0, 2),  # rank 0 slot 2 <- expert 3 from rank 1
                     Transfer(0, 0, 1, 1, 0)]  # rank 1 slot 0 <- expert 1 from rank 0 (slots 1, 2 stay)
    assert plan_moves([old], [old]) == []
    with pytest.raises(ValueError, match="slot counts"):
        plan_moves([old], [ExpertPlacement(num_experts=4, ep_size=2, layout=[[0, 1], [2, 3, 0, 1]])])
    with pytest.raises(ValueError, match="one per MoE layer"):
        plan_moves([old, old], [new])


def _run_ranks(tmp_path, world: int, fmt: str) -> list[dict]:
    from moelink.comm import find_free_port

    port = find_free_port("127.0.0.1")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    logs = [open(tmp_path / f"log{r}", "w") for r in range(world)]
    procs = [zygote.popen([sys.executable, "-m", "tests.helpers.expert_move_worker", str(r), str(world), str(port),
                               str(tmp_path), fmt], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    deadline = time.monotonic() + 120
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    assert all(p.returncode == 0 for p in procs), [(tmp_path / f"log{r}").read_text()[-2000:] for r in range(world)]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


# Float at EP 2 and 4; FP8 block-scaled and MXFP4 (with expert biases) at EP 2: every per-slot tensor of an
# expert (weights, block scales, MXFP4 blocks + scales, biases) must travel with it, bit for bit, and the
# kernels must read the moved slots after the switch.
@pytest.mark.parametrize("world,fmt", [(2, "float"), (4, "float"), (2, "fp8"), (2, "mxfp4")])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_move_on_gloo_ranks_outputs_unchanged(tmp_path, world, fmt):
    from tests.helpers.expert_move_worker import G, L, weights

    res = _run_ranks(tmp_path, world, fmt)
    w = weights(fmt)
    layouts = res[0]["layouts"]
    assert all(r["layouts"] == layouts for r in res)
    assert layouts[0] != layouts[1]
    moved = 0
    for r, out in enumerate(res):
        assert out["chunks"] == L
        # Serving between chunks (the first layer switched, the second not yet) and after: the same outputs, up
        # to float64 rounding (other replicas compute a token now, in other batches: the tensors are bit-exact).
        for mid in out["mids"]:
            torch.testing.assert_close(mid, out["before"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["after"], out["before"], rtol=1e-12, atol=1e-12)
        assert out["staged_between_chunks"] == [0] * L  # each chunk freed its staging when it switched
        for l in range(L):
            held = layouts[l][r]
            assert out["names"] == sorted(w[l]["experts"])
            for name, t in w[l]["experts"].items():  # every slot holds its new expert's tensors, bit for bit
                got = out["tensors"][l][name]
                assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t[held].view(torch.uint8)), \
                    (l, r, name)
            # the table now routes to the new copies
            copies = sum(5 in h for h in layouts[l])
            assert out["tables"][l][5].tolist() == [q for q in range(world) if 5 in layouts[l][q]] + \
                [-1] * (out["tables"][l].shape[1] - copies)
        assert out["tables_in_place"]  # same tensors: a captured decode graph would read the new tables
        moved += out["bytes_sent"]
    # The hot experts 5 and 6 got copies that were not there before: something crossed ranks, and every byte
    # sent was received (all of an expert's tensors: the slot's bytes, the same for every slot).
    assert moved > 0 and moved == sum(out["bytes_received"] for out in res)
    slot = sum(t[0].numel() * t.element_size() for t in w[0]["experts"].values())
    assert moved % slot == 0
    assert max(out["peak_staged_bytes"] for out in res) >= slot
    old = ExpertPlacement(num_experts=G, ep_size=world, num_redundant=4)
    assert layouts[0] != [old.experts_on_rank(q) for q in range(world)]


@pytest.mark.parametrize("fmt", ["float", "fp8", "mxfp4"])
def test_slot_bytes_counts_every_tensor_of_an_expert_and_refuses_what_cannot_move(fmt):
    from torch import nn

    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.expert_move import slot_bytes, slot_tensors
    from moelink.moe.layer import MoELayer
    from moelink.moe.router import SoftmaxTopKRouter
    from tests.helpers.expert_move_worker import DIMS, G, expert_format, weights

    D, I = DIMS[fmt]
    layer = MoELayer(D, I, G, SoftmaxTopKRouter(2, True), ReferenceKernels(), torch.float64,
                     expert_format=expert_format(fmt), expert_bias=fmt == "mxfp4")
    want = weights(fmt)[0]["experts"]
    assert sorted(slot_tensors(layer, G)) == sorted(want)  # the router's gate is not per slot
    assert slot_bytes(layer) == sum(t[0].numel() * t.element_size() for t in want.values())
    # A tensor not stacked per slot (a format with a layout EPLB cannot split) refuses EPLB, naming the flag.
    layer.global_amax = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"--eplb-interval.*global_amax"):
        slot_bytes(layer)
