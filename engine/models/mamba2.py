"""Mamba2, the selective state-space token mixer of Granite 4.0-H (GraniteMoeHybridMambaLayer in transformers 5.24;
Bamba's and Mamba2's mixers compute the same), over per-sequence state pools instead of a paged KV cache.

Per layer: in_proj gives z (the gate), x|B|C (one conv channel block: x, then B's groups, then C's) and dt (one per
head); a causal depthwise convolution (conv_kernel taps, with its bias, SiLU) runs over x|B|C with each sequence's
conv state (kernels/causal_conv1d.py, gated DeltaNet's); the SSD scan (kernels/mamba2.py: dt = softplus(dt +
dt_bias) clamped to time_step_limit, A = -exp(A_log), h = exp(dt A) h + dt x B^T, y = h C + D x) runs with each
sequence's SSM state; y * SiLU(z) is RMS-normed per group of intermediate / n_groups channels (norm_before_gate
False) and projected back by out_proj.

States: `ctx.kv_caches[layer]` is this layer's (conv_state_PRC, ssm_state_PNHK) pools (engine/state/cache.py) and
`ctx.state` (StateStep) the step's slot of each sequence and whether it continues a state. A pure-decode step (one
token per sequence) runs the decode forms; anything else the varlen prefill forms (a prompt split across steps
continues its states chunk to chunk). A speculative verify step reads the states without writing them and replays
the accepted tokens after sampling, as gated DeltaNet does.

Not sharded under tensor parallelism yet (engine/config/tensor_parallel.py refuses it).

Legend: T tokens in the flat batch, D hidden, N heads, H head dim, G groups, K state size, I intermediate (N H),
C conv channels (I + 2 G K), P state slots, R conv kernel - 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .layers import ForwardContext, param
from .linear import Linear, linear_method
from .mamba2_config import Mamba2Config
from .recurrent_state import causal_conv_step, conv_plan, mix_by_group

if TYPE_CHECKING:
    from moelink.engine.state.step import StateGroup, StateStep
    from moelink.kernels.ops import Kernels


class GroupedGatedRMSNorm(nn.Module):
    """y * SiLU(z), then RMS-normed over each group of `group` channels, times the weight (transformers'
    GraniteMoeHybridRMSNormGated / MambaRMSNormGated with norm_before_gate=False), in float32 (float64 for float64
    activations), the normed value cast to y's dtype before the weight."""

    def __init__(self, size: int, group: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.group, self.eps = group, eps

    def forward(self, y_TI: torch.Tensor, z_TI: torch.Tensor) -> torch.Tensor:
        cdt = torch.float64 if y_TI.dtype == torch.float64 else torch.float32
        h = y_TI.to(cdt) * torch.nn.functional.silu(z_TI.to(cdt))
        g = h.view(h.shape[0], -1, self.group)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(y_TI.dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba2 layer (module docstring)."""

    def __init__(self, layer_idx: int, hidden_size: int, cfg: Mamba2Config, kernels: Kernels, dtype, device=None,
                 quant=None, prefix: str | None = None):
        """prefix: the checkpoint names' prefix of this layer's mixer (default "model.layers.{i}.mamba."), which
        quant's modules_to_not_convert names."""
        super().__init__()
        self.layer_idx, self.cfg, self.kernels = layer_idx, cfg, kernels
        p = prefix if prefix is not None else f"model.layers.{layer_idx}.mamba."
        f = dict(dtype=dtype, device=device)
        self.in_proj = Linear(hidden_size, cfg.in_proj_dim, linear_method(quant, p + "in_proj"), kernels, **f)
        self.conv_weight_CW = param(cfg.conv_dim, cfg.conv_kernel, **f)
        self.conv_bias_C = param(cfg.conv_dim, **f) if cfg.conv_bias else None
        self.dt_bias_N = param(cfg.num_heads, **f)
        self.A_log_N = param(cfg.num_heads, **f)
        self.D_N = param(cfg.num_heads, **f)
        self.norm = GroupedGatedRMSNorm(cfg.intermediate, cfg.intermediate // cfg.n_groups, cfg.norm_eps, **f)
        self.out_proj = Linear(cfg.intermediate, hidden_size, linear_method(quant, p + "out_proj"), kernels, **f)
        self._replay: tuple | None = None

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions_T is unused (the recurrence orders the tokens); kept for the token mixers' one signature."""
        c, T = self.cfg, x_TD.shape[0]
        zxbcdt = self.in_proj(x_TD)
        I, C = c.intermediate, c.conv_dim
        z_TI, xbc_TC, dt_TN = zxbcdt[:, :I], zxbcdt[:, I:I + C].contiguous(), zxbcdt[:, I + C:].contiguous()
        y_TNH = self.recur(xbc_TC, dt_TN, ctx)
        return self.out_proj(self.norm(y_TNH.reshape(T, I), z_TI))

    def recur(self, xbc_TC: torch.Tensor, dt_TN: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The convolution and the scan of the step's sequences with their states (ctx.state): y [T, N, H]."""
        c, pools = self.cfg, ctx.kv_caches[self.layer_idx][:2]
        return mix_by_group(ctx.state, (xbc_TC, dt_TN), lambda xbc, dt, g, keep: self._mix(xbc, dt, pools, g, keep),
                            lambda: xbc_TC.new_empty(xbc_TC.shape[0], c.num_heads, c.head_dim))

    def _mix(self, xbc_TC, dt_TN, pools, g: StateStep | StateGroup, keep: bool) -> torch.Tensor:
        """The convolution and the scan over one group of sequences. `keep`: a verify group: the states are read
        but not written, and what `replay_states` needs is kept."""
        c, T, k = self.cfg, xbc_TC.shape[0], self.kernels
        conv_pool_PRC, ssm_pool_PNHK = pools
        qsl_S1, slots_S = g.query_start_loc_S1, g.slots_S
        conv_TC = causal_conv_step(k, xbc_TC, self.conv_weight_CW, self.conv_bias_C, conv_pool_PRC, g, keep)
        I, GK = c.intermediate, c.n_groups * c.state_size
        x_TNH = conv_TC[:, :I].view(T, c.num_heads, c.head_dim)
        B_TGK = conv_TC[:, I:I + GK].view(T, c.n_groups, c.state_size)
        C_TGK = conv_TC[:, I + GK:].view(T, c.n_groups, c.state_size)
        args = (x_TNH, dt_TN, B_TGK, C_TGK, self.A_log_N, self.D_N, self.dt_bias_N, ssm_pool_PNHK, qsl_S1, slots_S)
        if keep:
            self._replay = (xbc_TC, args, conv_pool_PRC)
            return k.mamba2_decode(*args, dt_min=c.dt_min, dt_max=c.dt_max, update_state=False)
        if g.pure_decode:
            return k.mamba2_decode(*args, dt_min=c.dt_min, dt_max=c.dt_max)
        return k.mamba2_scan(*args, g.has_initial_S, dt_min=c.dt_min, dt_max=c.dt_max)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: each verifying sequence's states advance over its accepted tokens only
        (num_accepted_S [S'] in the verify group's order: the last known token plus the accepted drafts)."""
        if self._replay is None:
            return
        xbc_TC, args, conv_pool_PRC = self._replay
        self._replay = None
        x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, ssm_pool_PNHK, qsl_S1, slots_S = args
        self.kernels.replay_conv_state(xbc_TC, conv_pool_PRC, qsl_S1, slots_S, num_accepted_S)
        self.kernels.mamba2_replay(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, ssm_pool_PNHK, qsl_S1, slots_S,
                                   num_accepted_S, dt_min=self.cfg.dt_min, dt_max=self.cfg.dt_max)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.mamba.")."""
        plan: WeightPlan = {}
        plan.update(self.in_proj.weight_plan(p + "in_proj.weight"))
        plan.update(conv_plan(p, self.conv_weight_CW, self.conv_bias_C))
        plan[p + "dt_bias"] = PlanEntry(self.dt_bias_N, ())
        plan[p + "A_log"] = PlanEntry(self.A_log_N, ())
        plan[p + "D"] = PlanEntry(self.D_N, ())
        plan[p + "norm.weight"] = PlanEntry(self.norm.weight, ())
        plan.update(self.out_proj.weight_plan(p + "out_proj.weight"))
        return plan


__all__ = ["GroupedGatedRMSNorm", "Mamba2Mixer"]
