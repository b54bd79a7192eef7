"""The MoE block under tensor parallelism, one of two ways (chosen by the flags, ParallelConfig.experts_split_by_tp).

1. EP over the world (expert_parallel_size > 1): `token_sliced_stages`. After the row-parallel all-reduce every rank
of the TP group holds the same hidden states; running the block on all of them on each rank would do the same expert
work N times (vLLM issue 24134). Each rank takes its 1/N slice of the tokens (TensorParallel.token_rows) into the
router, the EP all-to-all and the shared experts, and the group all-gathers the slices' outputs back into [T, D]: one
[T, D] all-gather per MoE layer (an all-reduce of [T, D] would move twice the bytes).

2. Routed experts split over a TP group by intermediate size (-tp N with expert_parallel_size 1, as vLLM runs TP
without --enable-expert-parallel): every rank holds every expert's [I/N] slice of gate, up and down, computes every
token with it, and the MoE block's output (routed + shared, both partial) is all-reduced once over the group
(engine/models/blocks/ffn.ffn_stages). The down projection is linear in the intermediate channels, so the
partial outputs sum to the whole; gpt-oss's clamped SwiGLU is per channel, and its down bias is added by the group's
first rank only.

Legend: E experts, I intermediate size (whole), w = I / N (a rank's), i0 = rank * w, D hidden.

Which checkpoint parts a rank reads (its shard only, through get_slice):
- per-expert layout `experts.{e}.gate_proj / up_proj.weight` [I, D]: rows [i0, i0 + w); `down_proj.weight` [D, I]:
  columns [i0, i0 + w);
- fused layout `experts.gate_up_proj` [E, 2I, D]: gate rows [i0, i0 + w) and up rows [I + i0, I + i0 + w) (two runs,
  read apart: engine/rank/loader._read); `experts.down_proj` [E, D, I]: the columns;
- gpt-oss `experts.gate_up_proj` [E, D, 2I] (gate / up interleaved columns) and `down_proj` [E, I, D]: the
  interleaved columns 2 i0 .. 2 (i0 + w) de-interleaved, and the down rows; the biases likewise.
Float and FP8 block-scaled experts split this way (FP8: a rank's w channels a whole number of blocks, its scales' block
rows / columns read with them); other formats are refused, naming the flag that places them in EP.
"""
from __future__ import annotations

import torch

from moelink.moe.expert_weights import fp8_plan
from moelink.moe.layer import Stages
from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .group import TensorParallel


def token_sliced_stages(tp: TensorParallel, moe, mlp, h_TD: torch.Tensor) -> Stages:
    """Way 1 (module docstring): `mlp` (the MoE layer `moe`, or it with shared experts) on this rank's token slice,
    the group's slices all-gathered into [T, D]. A padded decode graph's real rows (moe.valid_rows_T) are cut like
    the tokens for the block's run."""
    T = h_TD.shape[0]
    lo, hi = tp.token_rows(T)
    valid_T = moe.valid_rows_T
    if valid_T is not None:
        moe.valid_rows_T = valid_T[lo:hi]
    try:
        y_tD = yield from mlp.stages(h_TD[lo:hi])
    finally:
        moe.valid_rows_T = valid_T
    return tp.gather_rows(y_tD, T)


class ExpertShard:
    """This rank's slice [i0, i0 + w) of every expert's intermediate channels (of I)."""

    def __init__(self, tp: TensorParallel, inter: int):
        if inter % tp.size:
            raise ValueError(f"moe_intermediate_size={inter} is not a multiple of tensor_parallel_size={tp.size}: the "
                             f"experts cannot split over the TP group; pass --expert-parallel-size {tp.size} to place "
                             "them in EP instead.")
        self.rank, self.inter, self.w = tp.rank, inter, inter // tp.size
        self.i0 = tp.rank * self.w

    def plan(self, moe, m: str, fused: bool, expert_ids: list[int], names: tuple[str, str, str]) -> WeightPlan:
        """The experts' plan reading this rank's slice: float, or FP8 block-scaled with the block rows / columns of
        its slice (engine/config/tensor_parallel.py checks the slice falls on block boundaries)."""
        if moe.expert_format.name == "fp8":
            return self.fp8_plan(moe, m, fused, expert_ids, names)
        return self.float_plan(moe, m, fused, expert_ids, names)

    def fp8_plan(self, moe, m: str, fused: bool, expert_ids: list[int], names: tuple[str, str, str]) -> WeightPlan:
        """moe/expert_weights.Fp8BlockExperts' layouts, this rank's channels: w is a whole number of blocks, so its
        up rows start at w (no gap) and each piece reads its own block scales."""
        fmt = moe.expert_format
        (bn, bk), on, i0, w, inter = fmt.block, fmt.online, self.i0, self.w, self.inter
        w13, w2, s13, s2 = moe.w13_EFD, moe.w2_EDI, moe.w13_scale_inv_EFD, moe.w2_scale_inv_EDI
        own, own_k = slice(i0, i0 + w), slice(i0 // bk, (i0 + w) // bk)
        if fused:
            rows = torch.cat([torch.arange(i0, i0 + w), inter + torch.arange(i0, i0 + w)])
            blocks = torch.cat([torch.arange(i0 // bn, (i0 + w) // bn), inter // bn + torch.arange(i0 // bn, (i0 + w) // bn)])
            return {**fp8_plan(m + "experts.gate_up_proj", w13, s13, (), fmt.block, on, (slice(None), rows),
                               (slice(None), blocks)),
                    **fp8_plan(m + "experts.down_proj", w2, s2, (), fmt.block, on, (slice(None), slice(None), own),
                               (slice(None), slice(None), own_k))}
        gate, up, down = names
        own_n = slice(i0 // bn, (i0 + w) // bn)
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            p = f"{m}experts.{e}."
            plan.update(fp8_plan(f"{p}{gate}.weight", w13, s13, (local, slice(0, w)), fmt.block, on, (own,), (own_n,)))
            plan.update(fp8_plan(f"{p}{up}.weight", w13, s13, (local, slice(w, 2 * w)), fmt.block, on, (own,), (own_n,)))
            plan.update(fp8_plan(f"{p}{down}.weight", w2, s2, (local,), fmt.block, on, (slice(None), own),
                                 (slice(None), own_k)))
        return plan

    def float_plan(self, moe, m: str, fused: bool, expert_ids: list[int], names: tuple[str, str, str]) -> WeightPlan:
        """The float experts' plan (moe/expert_weights.FloatExperts' layouts) reading this rank's slice."""
        if moe.expert_format.name != "float":
            raise ValueError(f"expert weights in {moe.expert_format.name} cannot split over a TP group yet "
                             "(tensor_parallel_size > 1 with expert_parallel_size=1): pass --expert-parallel-size "
                             "equal to the world to place them in EP instead.")
        i0, w, inter = self.i0, self.w, self.inter
        own = slice(i0, i0 + w)
        if fused:
            rows = torch.cat([torch.arange(i0, i0 + w), inter + torch.arange(i0, i0 + w)])
            return {m + "experts.gate_up_proj": PlanEntry(moe.w13_EFD, (), (slice(None), rows)),
                    m + "experts.down_proj": PlanEntry(moe.w2_EDI, (), (slice(None), slice(None), own))}
        gate, up, down = names
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            plan[f"{m}experts.{e}.{gate}.weight"] = PlanEntry(moe.w13_EFD, (local, slice(0, w)), (own,))
            plan[f"{m}experts.{e}.{up}.weight"] = PlanEntry(moe.w13_EFD, (local, slice(w, 2 * w)), (own,))
            plan[f"{m}experts.{e}.{down}.weight"] = PlanEntry(moe.w2_EDI, (local,), (slice(None), own))
        return plan

    def gpt_oss_plan(self, moe, m: str, hidden: int) -> WeightPlan:
        """gpt-oss's fused, transposed, interleaved float experts and their biases, this rank's channels: gate_up
        columns [2 i0, 2 (i0 + w)) read alone, then de-interleaved ([gate; up]); down rows [i0, i0 + w)."""
        if moe.expert_format.name != "float":
            return self.float_plan(moe, m, True, [], ("", "", ""))  # refuses, naming the format
        i0, w = self.i0, self.w
        cols = slice(2 * i0, 2 * (i0 + w))  # this rank's interleaved gate / up columns, contiguous on disk
        f = torch.cat([torch.arange(0, 2 * w, 2), torch.arange(1, 2 * w, 2)])  # de-interleaved, within them
        # Read as stored ([E, D, 2w], [E, 2w], [E, w, D]), then put in moelink's layout ([E, 2w, D] [gate; up] rows,
        # [E, D, w]) by the destination (moe/weight_plan.Rearranged), as _gpt_oss_plan's advanced index does.
        plan: WeightPlan = {
            m + "experts.gate_up_proj": PlanEntry(Rearranged(moe.w13_EFD, lambda t: t[:, :, f].transpose(1, 2)), (),
                                                  (slice(None), slice(None), cols)),
            m + "experts.gate_up_proj_bias": PlanEntry(Rearranged(moe.b13_EF, lambda t: t[:, f]), (),
                                                       (slice(None), cols)),
            m + "experts.down_proj": PlanEntry(Rearranged(moe.w2_EDI, lambda t: t.transpose(1, 2)), (),
                                               (slice(None), slice(i0, i0 + w))),
        }
        if self.rank == 0:  # the down bias once per group (the others' stay zero)
            plan[m + "experts.down_proj_bias"] = PlanEntry(moe.b2_ED, ())
        return plan


__all__ = ["ExpertShard"]
