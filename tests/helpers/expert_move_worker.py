"""One EP rank of tests/moe/test_expert_move.py: two MoE layers over gloo, run, move to EPLB's placement, run.

argv: rank world_size port out_dir [format]. format: float (float64 weights), fp8 (FP8 block-scaled weights
and their float32 scales) or mxfp4 (MXFP4 blocks + E8M0 scales, with expert biases). Saves rank{r}.pt:
outputs before/after, every per-slot tensor after the move, bytes moved and staged, the placements. The
global weights come from a fixed seed, so every rank (and the test) knows every expert's tensors.
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
from moelink.moe.expert_weights import Fp8BlockExperts, FloatExperts, Mxfp4Experts
from moelink.moe.router import SoftmaxTopKRouter

G, L, TOP_K, REDUNDANT = 8, 2, 2, 4
DIMS = dict(float=(16, 8), fp8=(16, 8), mxfp4=(32, 32))  # (D, I): MXFP4 needs multiples of 32
FP8_BLOCK = (8, 8)


def expert_format(fmt: str):
    return dict(float=FloatExperts(), fp8=Fp8BlockExperts(FP8_BLOCK), mxfp4=Mxfp4Experts())[fmt]


def weights(fmt: str = "float"):
    """Per MoE layer: the router's gate and every per-slot tensor of every expert [G, ...], by layer name."""
    from moelink.kernels.fp8 import block_quantize
    from moelink.kernels.mxfp4 import mxfp4_quantize

    D, I = DIMS[fmt]
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(L):
        gate = torch.randn(G, D, generator=g, dtype=torch.float64)
        gate[:, 0] = 0.0
        gate[[5, 6], 0] = 3.0  # feature 0 (set large below) pulls most tokens to experts 5 and 6
        w13 = torch.randn(G, 2 * I, D, generator=g, dtype=torch.float64) / D**0.5
        w2 = torch.randn(G, D, I, generator=g, dtype=torch.float64) / I**0.5
        if fmt == "float":
            experts = dict(w13_EFD=w13, w2_EDI=w2)
        elif fmt == "fp8":
            (q13, s13), (q2, s2) = block_quantize(w13, FP8_BLOCK), block_quantize(w2, FP8_BLOCK)
            experts = dict(w13_EFD=q13, w13_scale_inv_EFD=s13, w2_EDI=q2, w2_scale_inv_EDI=s2)
        else:
            (b13, sc13), (b2, sc2) = mxfp4_quantize(w13.float()), mxfp4_quantize(w2.float())
            experts = dict(w13_blocks_EFSQ=b13, w13_scales_EFS=sc13, w2_blocks_EDSQ=b2, w2_scales_EDS=sc2,
                           b13_EF=torch.randn(G, 2 * I, generator=g, dtype=torch.float64) / 10,
                           b2_ED=torch.randn(G, D, generator=g, dtype=torch.float64) / 10)
        out.append(dict(gate=gate, experts=experts))
    return out


def tokens(rank: int, fmt: str = "float") -> torch.Tensor:
    x = torch.randn(5 + 2 * rank, DIMS[fmt][0], generator=torch.Generator().manual_seed(100 + rank),
                    dtype=torch.float64)
    x[:, 0] = 3.0
    return x


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fmt = sys.argv[5] if len(sys.argv) > 5 else "float"
    D, I = DIMS[fmt]
    group = init_process_group(rank, world, "127.0.0.1", port, "gloo", timeout_s=30.0)
    try:
        old = ExpertPlacement(num_experts=G, ep_size=world, num_redundant=REDUNDANT)
        a2a = make_all_to_all("torch", group, rank, world, "cpu")
        ep = ExpertParallel(rank, world, old, a2a, old.to_tensors("cpu"))
        layers = []
        for w in weights(fmt):
            layer = MoELayer(D, I, G, SoftmaxTopKRouter(TOP_K, True), ReferenceKernels(), torch.float64, ep=ep,
                             expert_format=expert_format(fmt), expert_bias=fmt == "mxfp4")
            local = old.experts_on_rank(rank)
            layer.gate_GD.copy_(w["gate"])
            for name, t in w["experts"].items():
                getattr(layer, name).copy_(t[local])
            layers.append(layer)
        names = sorted(weights(fmt)[0]["experts"])

        def run():
            x = tokens(rank, fmt)
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
        chunks, mids, staged_between_chunks = 0, [], []
        while not mover.done:
            mover.move(1)
            chunks += 1
            staged_between_chunks.append(mover.staged_bytes)  # a chunk frees its staging when it switches
            if not mover.done:
                mids.append(run())  # serving between chunks: the first layer switched, the second not yet
        mover.commit()
        after = run()
        torch.save(dict(before=before, mids=mids, after=after, chunks=chunks, names=names,
                        bytes_sent=mover.bytes_sent, bytes_received=mover.bytes_received,
                        peak_staged_bytes=mover.peak_staged_bytes, staged_between_chunks=staged_between_chunks,
                        tensors=[{n: getattr(layer, n).detach().clone() for n in names} for layer in layers],
                        layouts=[[p.experts_on_rank(r) for r in range(world)] for p in new],
                        tables=[layer.ep_tables.replica_rank_GX.clone() for layer in layers],
                        tables_in_place=[layer.ep_tables.replica_rank_GX.data_ptr() for layer in layers] == ptrs),
                   f"{out_dir}/rank{rank}.pt")
    finally:
        destroy()


if __name__ == "__main__":
    main()
