"""The gated short convolution, LFM2's token mixer (transformers 5.24's Lfm2ShortConv / Lfm2MoeShortConv), over
per-sequence conv states instead of a paged KV cache.

Per layer: in_proj gives B, C and x (hidden_size each, in that order); Bx = B * x runs through a causal depthwise
convolution (conv_kernel taps, its bias where conv_bias, no activation: kernels/causal_conv1d.py, gated DeltaNet's
and Mamba2's) with each sequence's conv state; y = C * conv(Bx) goes out through out_proj. in_proj and out_proj carry
biases where conv_bias says so.

States: `ctx.kv_caches[layer]` is this layer's (conv_state_PRC,) pool (engine/state/cache.py) and `ctx.state`
(StateStep) the step's slot of each sequence and whether it continues a state. A pure-decode step (one token per
sequence) runs the decode form; anything else the varlen prefill form (a prompt split across steps continues its
state chunk to chunk). A speculative verify step reads the state without writing it and replays the accepted tokens
after sampling, as gated DeltaNet does.

Not sharded under tensor parallelism yet (engine/config/tensor_parallel.py refuses it).

Legend: T tokens in the flat batch, D hidden (= C conv channels), P state slots, R conv kernel - 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .layers import ForwardContext, param
from .linear import Linear, linear_method
from .short_conv_config import ShortConvConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class ShortConvMixer(nn.Module):
    """One short-conv layer (module docstring)."""

    def __init__(self, layer_idx: int, hidden_size: int, cfg: ShortConvConfig, kernels: Kernels, dtype, device=None,
                 quant=None, prefix: str | None = None):
        """prefix: the checkpoint names' prefix of this layer's mixer (default "model.layers.{i}.conv."), which
        quant's modules_to_not_convert names."""
        super().__init__()
        if cfg.channels != hidden_size:
            raise ValueError(f"ShortConvConfig channels={cfg.channels} must equal hidden_size={hidden_size}.")
        self.layer_idx, self.cfg, self.kernels = layer_idx, cfg, kernels
        p = prefix if prefix is not None else f"model.layers.{layer_idx}.conv."
        f = dict(dtype=dtype, device=device)
        D = hidden_size
        self.in_proj = Linear(D, 3 * D, linear_method(quant, p + "in_proj"), kernels, **f)
        self.in_bias = param(3 * D, **f) if cfg.bias else None
        self.conv_weight_CW = param(D, cfg.conv_kernel, **f)
        self.conv_bias_C = param(D, **f) if cfg.bias else None
        self.out_proj = Linear(D, D, linear_method(quant, p + "out_proj"), kernels, **f)
        self.out_bias = param(D, **f) if cfg.bias else None
        self._replay: tuple | None = None

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions_T is unused (the convolution orders the tokens); kept for the token mixers' one signature."""
        D = self.cfg.channels
        bcx = self.in_proj(x_TD, self.in_bias)
        B_TD, C_TD, x = bcx[:, :D], bcx[:, D:2 * D], bcx[:, 2 * D:]
        conv_TD = self.recur((B_TD * x).contiguous(), ctx)
        return self.out_proj(C_TD * conv_TD, self.out_bias)

    def recur(self, bx_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The convolution of the step's sequences with their states (ctx.state): [T, D]."""
        st = ctx.state
        pool_PRC = ctx.kv_caches[self.layer_idx][0]
        if st.split is None:
            return self._conv(bx_TD, pool_PRC, st.query_start_loc_S1, st.slots_S, st.has_initial_S, st.pure_decode)
        # a verify step: the verifying sequences leave their states alone until replay_states
        out_TD = torch.empty_like(bx_TD)
        v = st.split.verify
        out_TD.index_copy_(0, v.rows_T, self._conv(bx_TD.index_select(0, v.rows_T), pool_PRC, v.query_start_loc_S1,
                                                   v.slots_S, v.has_initial_S, True, keep=True))
        r = st.split.rest
        if r is not None:
            out_TD.index_copy_(0, r.rows_T, self._conv(bx_TD.index_select(0, r.rows_T), pool_PRC,
                                                       r.query_start_loc_S1, r.slots_S, r.has_initial_S,
                                                       r.pure_decode))
        return out_TD

    def _conv(self, bx_TD, pool_PRC, qsl_S1, slots_S, has_initial_S, pure_decode: bool,
              keep: bool = False) -> torch.Tensor:
        """The convolution over one batch of sequences. `keep`: a verify batch: the state is read but not written,
        and what `replay_states` needs is kept."""
        k = self.kernels
        if keep:
            self._replay = (bx_TD, pool_PRC, qsl_S1, slots_S)
            S = slots_S.shape[0]
            return k.causal_conv1d_update(bx_TD, self.conv_weight_CW, self.conv_bias_C, pool_PRC, qsl_S1, slots_S,
                                          None, intermediate_states_SQRC=pool_PRC.new_empty(S, 0,
                                                                                            *pool_PRC.shape[1:]))
        if pure_decode:
            return k.causal_conv1d_update(bx_TD, self.conv_weight_CW, self.conv_bias_C, pool_PRC, qsl_S1, slots_S,
                                          None)
        return k.causal_conv1d(bx_TD, self.conv_weight_CW, self.conv_bias_C, pool_PRC, qsl_S1, slots_S,
                               has_initial_S, None)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: each verifying sequence's conv state advances over its accepted tokens
        only (num_accepted_S [S'] in the verify group's order)."""
        if self._replay is None:
            return
        bx_TD, pool_PRC, qsl_S1, slots_S = self._replay
        self._replay = None
        self.kernels.replay_conv_state(bx_TD, pool_PRC, qsl_S1, slots_S, num_accepted_S)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.conv.")."""
        plan: WeightPlan = {}
        plan.update(self.in_proj.weight_plan(p + "in_proj.weight"))
        # conv.weight is [C, 1, W] on disk: read as [C, W] (the middle index 0 drops the channel-group dim).
        plan[p + "conv.weight"] = PlanEntry(self.conv_weight_CW, (), (slice(None), 0))
        plan.update(self.out_proj.weight_plan(p + "out_proj.weight"))
        for name, t in (("in_proj.bias", self.in_bias), ("conv.bias", self.conv_bias_C),
                        ("out_proj.bias", self.out_bias)):
            if t is not None:
                plan[p + name] = PlanEntry(t, ())
        return plan


__all__ = ["ShortConvMixer"]
