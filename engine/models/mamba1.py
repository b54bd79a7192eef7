"""Mamba1, the selective state-space token mixer of Jamba (JambaMambaMixer in transformers 5.24, its torch path),
over per-sequence state pools instead of a paged KV cache.

Per layer: in_proj gives x and z (the gate), each `intermediate` wide; a causal depthwise convolution (conv_kernel
taps, with its bias, SiLU) runs over x with each sequence's conv state (kernels/causal_conv1d.py, gated DeltaNet's
and Mamba2's); x_proj gives dt (dt_rank), B and C (state_size each), each RMS-normed by its own weight where the
config says so (Jamba's dt_layernorm, b_layernorm, c_layernorm); dt_proj's matmul (its bias added inside the scan)
widens dt to every channel; the selective scan (kernels/mamba1.py: dt = softplus(dt + dt_bias), A = -exp(A_log)
[intermediate, state_size], h = exp(dt A) h + dt x B, y = h C + D x) runs with each sequence's SSM state;
y * SiLU(z) is projected back by out_proj.

States: `ctx.kv_caches[layer]` is this layer's (conv_state_PRI, ssm_state_PIK) pools (engine/state/cache.py) and
`ctx.state` (StateStep) the step's slot of each sequence and whether it continues a state. A pure-decode step (one
token per sequence) runs the decode forms; anything else the varlen prefill forms (a prompt split across steps
continues its states chunk to chunk). A speculative verify step reads the states without writing them and replays
the accepted tokens after sampling, as Mamba2 and gated DeltaNet do.

Not sharded under tensor parallelism yet (engine/config/tensor_parallel.py refuses it).

Legend: T tokens in the flat batch, D hidden, I intermediate, K state size, R dt rank, P state slots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .layers import ForwardContext, RMSNorm, param
from .linear import Linear, linear_method
from .mamba1_config import Mamba1Config
from .recurrent_state import causal_conv_step, conv_plan, mix_by_group

if TYPE_CHECKING:
    from moelink.engine.state.step import StateGroup, StateStep
    from moelink.kernels.ops import Kernels


class Mamba1Mixer(nn.Module):
    """One Mamba1 layer (module docstring)."""

    def __init__(self, layer_idx: int, hidden_size: int, cfg: Mamba1Config, kernels: Kernels, dtype, device=None,
                 quant=None, prefix: str | None = None):
        """prefix: the checkpoint names' prefix of this layer's mixer (default "model.layers.{i}.mamba."), which
        quant's modules_to_not_convert names."""
        super().__init__()
        self.layer_idx, self.cfg, self.kernels = layer_idx, cfg, kernels
        p = prefix if prefix is not None else f"model.layers.{layer_idx}.mamba."
        f = dict(dtype=dtype, device=device)
        I, K, R = cfg.intermediate, cfg.state_size, cfg.dt_rank
        self.in_proj = Linear(hidden_size, 2 * I, linear_method(quant, p + "in_proj"), kernels, **f)
        self.conv_weight_IW = param(I, cfg.conv_kernel, **f)
        self.conv_bias_I = param(I, **f) if cfg.conv_bias else None
        self.x_proj = Linear(I, cfg.x_proj_dim, linear_method(quant, p + "x_proj"), kernels, **f)
        self.dt_proj = Linear(R, I, linear_method(quant, p + "dt_proj"), kernels, **f)
        self.dt_bias_I = param(I, **f)
        self.A_log_IK = param(I, K, **f)
        self.D_I = param(I, **f)
        self.out_proj = Linear(I, hidden_size, linear_method(quant, p + "out_proj"), kernels, **f)
        self.norms: dict[str, RMSNorm] = {}
        if cfg.inner_norms:
            self.dt_layernorm = RMSNorm(R, cfg.norm_eps, kernels, **f)
            self.b_layernorm = RMSNorm(K, cfg.norm_eps, kernels, **f)
            self.c_layernorm = RMSNorm(K, cfg.norm_eps, kernels, **f)
            self.norms = {"dt_layernorm": self.dt_layernorm, "b_layernorm": self.b_layernorm,
                          "c_layernorm": self.c_layernorm}
        self._replay: tuple | None = None

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions_T is unused (the recurrence orders the tokens); kept for the token mixers' one signature."""
        I = self.cfg.intermediate
        xz = self.in_proj(x_TD)
        x_TI, z_TI = xz[:, :I].contiguous(), xz[:, I:]
        y_TI = self.recur(x_TI, ctx)
        cdt = torch.float64 if y_TI.dtype == torch.float64 else torch.float32
        gated = (y_TI.to(cdt) * F.silu(z_TI.to(cdt))).to(x_TD.dtype)
        return self.out_proj(gated)

    def recur(self, x_TI: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The convolution, x_proj/dt_proj and the scan of the step's sequences with their states (ctx.state): y
        [T, I] (D's skip included, before the gate)."""
        pools = ctx.kv_caches[self.layer_idx][:2]
        return mix_by_group(ctx.state, (x_TI,), lambda x, g, keep: self._mix(x, pools, g, keep),
                            lambda: x_TI.new_empty(x_TI.shape[0], self.cfg.intermediate))

    def _ssm_inputs(self, u_TI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj's dt, B, C of the convolved x (each normed where Jamba norms them), dt widened by dt_proj's matmul
        (its bias is the scan's dt_bias): (dt_TI, B_TK, C_TK)."""
        c = self.cfg
        R, K = c.dt_rank, c.state_size
        dbc = self.x_proj(u_TI)
        dt_TR, B_TK, C_TK = dbc[:, :R].contiguous(), dbc[:, R:R + K].contiguous(), dbc[:, R + K:].contiguous()
        if c.inner_norms:
            dt_TR, B_TK, C_TK = self.dt_layernorm(dt_TR), self.b_layernorm(B_TK), self.c_layernorm(C_TK)
        return self.dt_proj(dt_TR), B_TK, C_TK

    def _mix(self, x_TI, pools, g: StateStep | StateGroup, keep: bool) -> torch.Tensor:
        """The convolution and the scan over one group of sequences. `keep`: a verify group: the states are read
        but not written, and what `replay_states` needs is kept."""
        k = self.kernels
        conv_pool_PRI, ssm_pool_PIK = pools
        qsl_S1, slots_S = g.query_start_loc_S1, g.slots_S
        u_TI = causal_conv_step(k, x_TI, self.conv_weight_IW, self.conv_bias_I, conv_pool_PRI, g, keep)
        dt_TI, B_TK, C_TK = self._ssm_inputs(u_TI)
        args = (u_TI, dt_TI, B_TK, C_TK, self.A_log_IK, self.D_I, self.dt_bias_I, ssm_pool_PIK, qsl_S1, slots_S)
        if keep:
            self._replay = (x_TI, args, conv_pool_PRI)
            return k.mamba1_decode(*args, update_state=False)
        if g.pure_decode:
            return k.mamba1_decode(*args)
        return k.mamba1_scan(*args, g.has_initial_S)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: each verifying sequence's states advance over its accepted tokens only
        (num_accepted_S [S'] in the verify group's order: the last known token plus the accepted drafts)."""
        if self._replay is None:
            return
        x_TI, args, conv_pool_PRI = self._replay
        self._replay = None
        u_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, ssm_pool_PIK, qsl_S1, slots_S = args
        self.kernels.replay_conv_state(x_TI, conv_pool_PRI, qsl_S1, slots_S, num_accepted_S)
        self.kernels.mamba1_replay(u_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, ssm_pool_PIK, qsl_S1, slots_S,
                                   num_accepted_S)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.mamba.")."""
        plan: WeightPlan = {}
        plan.update(self.in_proj.weight_plan(p + "in_proj.weight"))
        plan.update(conv_plan(p, self.conv_weight_IW, self.conv_bias_I))
        plan.update(self.x_proj.weight_plan(p + "x_proj.weight"))
        plan.update(self.dt_proj.weight_plan(p + "dt_proj.weight"))
        plan[p + "dt_proj.bias"] = PlanEntry(self.dt_bias_I, ())
        plan[p + "A_log"] = PlanEntry(self.A_log_IK, ())
        plan[p + "D"] = PlanEntry(self.D_I, ())
        for name, norm in self.norms.items():
            plan.update(norm.weight_plan(p + name + ".weight"))
        plan.update(self.out_proj.weight_plan(p + "out_proj.weight"))
        return plan


__all__ = ["Mamba1Mixer"]
