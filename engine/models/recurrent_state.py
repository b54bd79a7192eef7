"""What the modules of the layer kinds that keep per-sequence state instead of a paged KV cache (Mamba1, Mamba2)
share: the causal convolution's checkpoint names; per step, its three forms and the split of a speculative verify
step into the verifying sequences and the rest. What their configs share: recurrent_state_config.py.

The step's groups (engine/state/step.py: a StateStep, or a VerifySplit's StateGroup) all carry query_start_loc_S1,
slots_S, has_initial_S and pure_decode, which is what the pieces here read.

Legend: T tokens in the flat batch, C conv channels, W conv taps, P state slots, R conv kernel - 1, S sequences.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from moelink.moe.weight_plan import PlanEntry, WeightPlan

if TYPE_CHECKING:
    from moelink.engine.state.step import StateGroup, StateStep
    from moelink.kernels.ops import Kernels


def causal_conv_step(kernels: Kernels, x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None,
                     pool_PRC: torch.Tensor, g: StateStep | StateGroup, keep: bool,
                     activation: str | None = "silu") -> torch.Tensor:
    """The causal depthwise convolution of one group's tokens with their conv states. keep (a verify group): the
    decode form with an empty intermediate-states buffer, which reads the states and writes nothing (the accepted
    tokens are replayed later); a pure-decode group: the decode form, the states advanced; else the varlen prefill
    form, continuing the states where has_initial_S says so."""
    qsl_S1, slots_S = g.query_start_loc_S1, g.slots_S
    if keep:
        none_kept = pool_PRC.new_empty(slots_S.shape[0], 0, *pool_PRC.shape[1:])
        return kernels.causal_conv1d_update(x_TC, weight_CW, bias_C, pool_PRC, qsl_S1, slots_S, activation,
                                            intermediate_states_SQRC=none_kept)
    if g.pure_decode:
        return kernels.causal_conv1d_update(x_TC, weight_CW, bias_C, pool_PRC, qsl_S1, slots_S, activation)
    return kernels.causal_conv1d(x_TC, weight_CW, bias_C, pool_PRC, qsl_S1, slots_S, g.has_initial_S, activation)


def conv_plan(p: str, weight_CW: torch.Tensor, bias_C: torch.Tensor | None) -> WeightPlan:
    """The causal convolution's checkpoint names under `p`: conv1d.weight is [C, 1, W] on disk, read as [C, W] (the
    middle index 0 drops the channel-group dim); conv1d.bias where the layer has one."""
    plan: WeightPlan = {p + "conv1d.weight": PlanEntry(weight_CW, (), (slice(None), 0))}
    if bias_C is not None:
        plan[p + "conv1d.bias"] = PlanEntry(bias_C, ())
    return plan


def mix_by_group(st: StateStep, inputs: tuple[torch.Tensor, ...],
                 mix: Callable[..., torch.Tensor], empty: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`mix(*inputs, group, keep)` over the step: in one call, or, in a verify step, once over the verifying
    sequences' rows (keep=True: their states read, not written, until replay_states) and once over the rest, each
    group's rows of `inputs` selected and its output rows copied into `empty()` (the step's [T, ...] output)."""
    if st.split is None:
        return mix(*inputs, st, False)
    out = empty()
    for g, keep in ((st.split.verify, True), (st.split.rest, False)):
        if g is not None:
            out.index_copy_(0, g.rows_T, mix(*(t.index_select(0, g.rows_T) for t in inputs), g, keep))
    return out


__all__ = ["causal_conv_step", "conv_plan", "mix_by_group"]
