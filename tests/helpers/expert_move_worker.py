"""One EP rank of tests/moe/test_expert_move.py: two MoE layers over gloo, run, move to EPLB's placement, run.

argv: rank world_size port out_dir. Saves rank{r}.pt: outputs before/after, each slot's weights after the
move, bytes moved, the placements. The global weights come from a fixed seed, so every rank (and the test)
knows every expert's weights.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from moelink.comm import destroy, init_process_group, make_all_to_all
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.eplb import rebalance_experts
from moelink.moe.expert_move import ExpertMover
from moelink.moe.layer import ExpertParallel, MoELayer
from moelink.moe.placement import ExpertPlacement
from moelink.moe.router import SoftmaxTopKRouter

G, D, I, L, TOP_K, REDUNDANT = 8, 16, 8, 2, 2, 4


def weights():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(L):
        gate = torch.randn(G, D, generator=g, dtype=torch.float64)
        gate[:, 0] = 0.0
        gate[[5, 6], 0] = 3.0  # feature 0 (set large below) pulls most tokens to experts 5 and 6
        out.append(dict(gate=gate, w13=torch.randn(G, 2 * I, D, generator=g, dtype=torch.float64) / D**0.5,
                        w2=torch.randn(G, D, I, generator=g, dtype=torch.float64) / I**0.5))
    return out


def tokens(rank: int) -> torch.Tensor:
    x = torch.randn(5 + 2 * rank, D, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    x[:, 0] = 3.0
    return x


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    group = init_process_group(rank, world, "127.0.0.1", port, "gloo", timeout_s=30.0)
    try:
        old = ExpertPlacement(num_experts=G, ep_size=world, num_redundant=REDUNDANT)
        a2a = make_all_to_all("torch", group, rank, world, "cpu")
        ep = ExpertParallel(rank, world, old, a2a, old.to_tensors("cpu"))
        layers = []
        for w in weights():
            layer = MoELayer(D, I, G, SoftmaxTopKRouter(TOP_K, True), ReferenceKernels(), torch.float64, ep=ep)
            local = old.experts_on_rank(rank)
            layer.gate_GD.copy_(w["gate"])
            layer.w13_EFD.copy_(w["w13"][local])
            layer.w2_EDI.copy_(w["w2"][local])
            layers.append(layer)

        def run():
            x = tokens(rank)
            for layer in layers:
                x = x + layer(x)
            return x

        before = run()
        ptrs = [layer.ep_tables.replica_rank_GX.data_ptr() for layer in layers]
        load = np.zeros((L, G))
        load[:] = 2.0
        load[0, [5, 6]] = 10.0
        load[1, [1, 6]] = 10.0  # another layout per layer: each layer must switch to its own tables
        new = rebalance_experts(load, old).placements
        mover = ExpertMover(layers, rank, group, [old] * L, new, torch.device("cpu"))
        chunks = 0
        while not mover.done:
            mover.move(1)
            chunks += 1
            mid = run()  # still serving on the old placement between chunks
        after_run_old = mid
        mover.commit()
        after = run()
        torch.save(dict(before=before, mid=after_run_old, after=after, chunks=chunks,
                        bytes_sent=mover.bytes_sent, bytes_received=mover.bytes_received,
                        w13=[layer.w13_EFD.detach().clone() for layer in layers],
                        w2=[layer.w2_EDI.detach().clone() for layer in layers],
                        layouts=[[p.experts_on_rank(r) for r in range(world)] for p in new],
                        tables=[layer.ep_tables.replica_rank_GX.clone() for layer in layers],
                        tables_in_place=[layer.ep_tables.replica_rank_GX.data_ptr() for layer in layers] == ptrs),
                   f"{out_dir}/rank{rank}.pt")
    finally:
        destroy()


if __name__ == "__main__":
    main()
