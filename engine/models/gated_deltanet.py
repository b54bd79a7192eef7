"""Gated DeltaNet, the linear-attention token mixer of Qwen3-Next and Qwen3.5-MoE (three layers in four), over
per-sequence state pools instead of a paged KV cache.

Per layer: the input projections give q, k, v (one conv channel block: q then k then v, heads contiguous), the
output gate z and the gating inputs b, a; a causal depthwise convolution (kernel 4, SiLU) runs over q|k|v with
each sequence's conv state; the gated delta rule (kernels/gated_delta.py: q/k l2-normed in the kernel, decay g =
-exp(A_log) softplus(a + dt_bias), write strength beta = sigmoid(b)) runs with each sequence's recurrent state;
the output is RMS-normed per value head, gated by SiLU(z), and projected back (transformers' Qwen3NextGatedDeltaNet).

The checkpoint's fused projections (Qwen3-Next: in_proj_qkvz, in_proj_ba, rows grouped by q/k head) are read in
this module's order by a row permutation at load, so one matmul gives [q | k | v | z] and another [b | a] with
every piece contiguous; Qwen3.5's split projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) load into the
same pieces by name.

Under tensor parallelism a rank holds whole q/k head groups and their value heads (GatedDeltaNet.__init__): its
rows of every projection, its conv channels, out_proj's columns (one all-reduce), states of its heads only.

States: `ctx.kv_caches[layer]` is this layer's (conv_state_PRC, ssm_state_PNKV) pools (engine/state/cache.py)
and `ctx.state` (StateStep) the step's slot of each sequence and whether it continues a state. A pure-decode step
(one token per sequence) runs the decode forms; anything else the varlen prefill forms.

Legend: T tokens in the flat batch, D hidden, S sequences, G q/k heads, N value heads, K q/k head dim, V value head
dim, C conv channels (2 G K + N V), P state slots, R conv kernel - 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .gated_deltanet_config import LinearAttentionConfig
from ..tp.attention import shard_attention
from ..tp.group import TensorParallel
from ..tp.linear import OwnRows, RowParallel
from .layers import ForwardContext, param
from .linear import FloatLinear, Linear, linear_method

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


def fused_qkvz_rows(la: LinearAttentionConfig, g0: int = 0, groups: int | None = None) -> torch.Tensor:
    """The checkpoint rows of in_proj_qkvz in this module's order [q heads | k heads | v heads | z heads], for the
    q/k head groups [g0, g0 + groups) (all by default; a TP rank's own under tensor parallelism).

    On disk the rows come per q/k head g: [q_g (K), k_g (K), v of g's N/G value heads (N/G * V), z of them]
    (transformers' fix_query_key_value_ordering), so value head n = g * N/G + j sits in group g: a rank's groups
    are one contiguous range of rows."""
    K, V, r = la.head_k_dim, la.head_v_dim, la.num_v_heads // la.num_k_heads
    group = 2 * K + 2 * r * V
    base = (g0 + torch.arange(la.num_k_heads if groups is None else groups))[:, None] * group
    q = (base + torch.arange(K)).reshape(-1)
    k = (base + K + torch.arange(K)).reshape(-1)
    v = (base + 2 * K + torch.arange(r * V)).reshape(-1)
    z = (base + 2 * K + r * V + torch.arange(r * V)).reshape(-1)
    return torch.cat([q, k, v, z])


def fused_ba_rows(la: LinearAttentionConfig, g0: int = 0, groups: int | None = None) -> torch.Tensor:
    """in_proj_ba's rows in the order [b of every value head | a of every value head] of the q/k head groups
    [g0, g0 + groups) (on disk: per q/k head g, b then a of its N/G value heads)."""
    r = la.num_v_heads // la.num_k_heads
    base = (g0 + torch.arange(la.num_k_heads if groups is None else groups))[:, None] * 2 * r
    return torch.cat([(base + torch.arange(r)).reshape(-1), (base + r + torch.arange(r)).reshape(-1)])


def split_qkv_rows(la: LinearAttentionConfig, g0: int, groups: int) -> torch.Tensor:
    """The rows of Qwen3.5's in_proj_qkv ([q of every head | k | v], heads in order), and the channels of conv1d,
    that belong to the q/k head groups [g0, g0 + groups): three contiguous runs, q's, k's and v's."""
    K, V, r = la.head_k_dim, la.head_v_dim, la.num_v_heads // la.num_k_heads
    q0, k0, v0 = g0 * K, la.key_dim + g0 * K, 2 * la.key_dim + g0 * r * V
    return torch.cat([torch.arange(q0, q0 + groups * K), torch.arange(k0, k0 + groups * K),
                      torch.arange(v0, v0 + groups * r * V)])


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then * SiLU(z) (transformers' Qwen3NextRMSNormGated: the norm's product in the
    activations' dtype, the gate in float32), or * sigmoid(z) (LinearAttentionConfig.output_gate_act: Qwen3.8-Flash-
    Next's output_gate_type)."""

    def __init__(self, size: int, eps: float, dtype, device=None, activation: str = "silu"):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps
        self.act = torch.sigmoid if activation == "sigmoid" else torch.nn.functional.silu

    def forward(self, x_TNV: torch.Tensor, z_TNV: torch.Tensor) -> torch.Tensor:
        x32 = x_TNV.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x_TNV.dtype)
        return (self.weight * normed * self.act(z_TNV.float())).to(x_TNV.dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer (module docstring)."""

    def __init__(self, layer_idx: int, hidden_size: int, la: LinearAttentionConfig, rms_norm_eps: float,
                 kernels: Kernels, dtype, device=None, tp: TensorParallel | None = None, quant=None):
        """tp: the rank's TensorParallel (engine/tp/group.py; None: whole). Under TP this rank holds
        num_k_heads / size q/k heads and the value heads of their groups (engine/tp/attention.
        shard_attention): their rows of the input projections, their conv channels, dt_bias and A_log, and
        out_proj's columns (row-parallel: one all-reduce). Every head's conv and delta rule is its own, so nothing
        else crosses ranks, and the state pools (sized from the rank's config) hold the rank's heads only.
        quant: engine/config/quantization.py's config (None = float): out_proj and the split in_proj_qkv / in_proj_z
        run FP8 where it quantizes them (below: which are held float)."""
        super().__init__()
        full, size = la, (tp.size if tp is not None else 1)
        la = shard_attention(la, size)
        self.layer_idx, self.la, self.full, self.kernels = layer_idx, la, full, kernels
        N, V = la.num_v_heads, la.head_v_dim
        self.key_dim, self.value_dim = la.key_dim, la.value_dim
        # This rank's first q/k head group and value head (0 without TP).
        self.g0 = tp.rank * la.num_k_heads if size > 1 else 0
        self.n0 = self.g0 * (N // la.num_k_heads)
        col, row = (OwnRows(), RowParallel(tp, self.n0 * V, self.value_dim)) if size > 1 else (None, None)
        self.sharded = size > 1
        # The fused in_proj_qkvz's rows are regrouped per head kind at load (fused_qkvz_rows), and a TP rank reads
        # three runs of the split in_proj_qkv (split_qkv_rows): FP8 blocks follow neither, so those are held float,
        # an FP8 checkpoint's dequantized as they load (engine/rank/fp8_linears.py). The split, unsharded in_proj_qkv /
        # in_proj_z stack keeps every block: FP8 where the checkpoint is. in_proj_ba (2 N rows, float in Qwen's FP8
        # releases) is held float (dequantized at load where a checkpoint ships it FP8).
        p = f"model.layers.{layer_idx}.linear_attn."
        qkvz = (linear_method(quant, p + "in_proj_qkv", p + "in_proj_z")
                if la.projection == "split" and size == 1 else FloatLinear())
        self.in_proj_qkvz = Linear(hidden_size, (2 * self.key_dim + self.value_dim, self.value_dim), qkvz,
                                   kernels, dtype, device, parallel=col)
        self.in_proj_ba = Linear(hidden_size, (N, N), FloatLinear(), kernels, dtype, device, parallel=col)
        self.conv_weight_CW = param(la.conv_dim, la.conv_kernel, dtype=dtype, device=device)
        self.dt_bias_N = param(N, dtype=dtype, device=device)
        self.A_log_N = param(N, dtype=dtype, device=device)
        self.norm = GatedRMSNorm(V, rms_norm_eps, dtype, device, la.output_gate_act)
        self.out_proj = Linear(self.value_dim, hidden_size, linear_method(quant, p + "out_proj"), kernels, dtype,
                               device, parallel=row)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions_T is unused (no rotary: the recurrence orders the tokens); kept for the token mixers' one
        signature."""
        mixed_TC, g_TN, beta_TN, gate = self.project(x_TD)
        return self.finish(self.recur(mixed_TC, g_TN, beta_TN, ctx), gate)

    def project(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the conv input q|k|v [T, C], the decay g [T, N], the write strength beta [T, N], the output gate z)."""
        mixed_TC, z_TX = self.in_proj_qkvz.split(self.in_proj_qkvz(x_TD))
        b_TN, a_TN = self.in_proj_ba.split(self.in_proj_ba(x_TD))
        g_TN, beta_TN = self.kernels.gdn_gating(a_TN, b_TN, self.A_log_N, self.dt_bias_N)
        return mixed_TC.contiguous(), g_TN, beta_TN, z_TX

    def finish(self, o_TNV: torch.Tensor, z_TX: torch.Tensor) -> torch.Tensor:
        la, T = self.la, o_TNV.shape[0]
        o_TNV = self.norm(o_TNV, z_TX.view(T, la.num_v_heads, la.head_v_dim))
        return self.out_proj(o_TNV.reshape(T, self.value_dim))

    def recur(self, mixed_TC: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
              ctx: ForwardContext) -> torch.Tensor:
        """The convolution and the delta rule of the step's sequences with their states (ctx.state): o [T, N, V].
        g may be per key channel ([T, N, K]: Kimi Delta Attention, kimi_delta.py)."""
        la, T = self.la, mixed_TC.shape[0]
        st = ctx.state
        # (conv_state_PRC, ssm_state_PNKV), then any states of a block beside it (a PLE: engine/models/qwen4_exp/)
        pools = ctx.kv_caches[self.layer_idx][:2]
        if st.split is None:
            return self._mix(mixed_TC, g_TN, beta_TN, pools, st.query_start_loc_S1, st.slots_S, st.has_initial_S,
                             st.pure_decode)
        # a verify step: the verifying sequences leave their states alone until replay_states
        o_TNV = torch.empty(T, la.num_v_heads, la.head_v_dim, dtype=mixed_TC.dtype, device=mixed_TC.device)
        v = st.split.verify
        mixed_VC = mixed_TC.index_select(0, v.rows_T)
        g_VN, beta_VN = g_TN.index_select(0, v.rows_T), beta_TN.index_select(0, v.rows_T)
        o_TNV.index_copy_(0, v.rows_T, self._mix(mixed_VC, g_VN, beta_VN, pools, v.query_start_loc_S1, v.slots_S,
                                                 v.has_initial_S, True, keep=True))
        r = st.split.rest
        if r is not None:
            o_TNV.index_copy_(0, r.rows_T, self._mix(
                mixed_TC.index_select(0, r.rows_T), g_TN.index_select(0, r.rows_T),
                beta_TN.index_select(0, r.rows_T), pools, r.query_start_loc_S1, r.slots_S, r.has_initial_S,
                r.pure_decode))
        return o_TNV

    def _mix(self, mixed_TC, g_TN, beta_TN, pools, qsl_S1, slots_S, has_initial_S, pure_decode: bool,
             keep: bool = False) -> torch.Tensor:
        """The convolution and the delta rule over one batch of sequences. `keep`: a verify batch: the states are
        read but not written (empty intermediate buffers), and what `replay_states` needs is kept."""
        la, T = self.la, mixed_TC.shape[0]
        conv_pool_PRC, ssm_pool_PNKV = pools
        S = slots_S.shape[0]
        if keep:
            conv_TC = self.kernels.causal_conv1d_update(
                mixed_TC, self.conv_weight_CW, None, conv_pool_PRC, qsl_S1, slots_S, "silu",
                intermediate_states_SQRC=conv_pool_PRC.new_empty(S, 0, *conv_pool_PRC.shape[1:]))
        elif pure_decode:
            conv_TC = self.kernels.causal_conv1d_update(mixed_TC, self.conv_weight_CW, None, conv_pool_PRC, qsl_S1,
                                                        slots_S, "silu")
        else:
            conv_TC = self.kernels.causal_conv1d(mixed_TC, self.conv_weight_CW, None, conv_pool_PRC, qsl_S1,
                                                 slots_S, has_initial_S, "silu")
        q_TGK = conv_TC[:, :self.key_dim].view(T, la.num_k_heads, la.head_k_dim)
        k_TGK = conv_TC[:, self.key_dim:2 * self.key_dim].view(T, la.num_k_heads, la.head_k_dim)
        v_TNV = conv_TC[:, 2 * self.key_dim:].view(T, la.num_v_heads, la.head_v_dim)
        if keep:
            self._replay = (mixed_TC, k_TGK, v_TNV, g_TN, beta_TN, qsl_S1, slots_S, pools)
            return self.kernels.gated_delta_rule_decode(
                q_TGK, k_TGK, v_TNV, g_TN, beta_TN, ssm_pool_PNKV, qsl_S1, slots_S,
                intermediate_states_SQNKV=ssm_pool_PNKV.new_empty(S, 0, *ssm_pool_PNKV.shape[1:]))
        if pure_decode:
            return self.kernels.gated_delta_rule_decode(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, ssm_pool_PNKV, qsl_S1,
                                                        slots_S)
        return self.kernels.gated_delta_rule(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, ssm_pool_PNKV, qsl_S1, slots_S,
                                             has_initial_S)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: each verifying sequence's states advance over its accepted tokens only
        (num_accepted_S [S'] in the verify group's order: the last known token plus the accepted drafts)."""
        if getattr(self, "_replay", None) is None:
            return
        mixed_TC, k_TGK, v_TNV, g_TN, beta_TN, qsl_S1, slots_S, (conv_pool_PRC, ssm_pool_PNKV) = self._replay
        self._replay = None
        self.kernels.replay_conv_state(mixed_TC, conv_pool_PRC, qsl_S1, slots_S, num_accepted_S)
        self.kernels.replay_gated_delta_state(k_TGK, v_TNV, g_TN, beta_TN, ssm_pool_PNKV, qsl_S1, slots_S,
                                              num_accepted_S)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.linear_attn."); under TP this rank's rows (heads) only,
        each tensor's rows one contiguous range or a few (q's, k's, v's), read alone."""
        full, G, N = self.full, self.la.num_k_heads, self.la.num_v_heads
        plan: WeightPlan = {}
        value_heads = (torch.arange(self.n0 * full.head_v_dim, (self.n0 + N) * full.head_v_dim),)
        heads = (torch.arange(self.n0, self.n0 + N),)
        if full.projection == "fused":
            plan.update(self.in_proj_qkvz.method.weight_plan(self.in_proj_qkvz, p + "in_proj_qkvz.weight", (),
                                                             (fused_qkvz_rows(full, self.g0, G),)))
            plan.update(self.in_proj_ba.method.weight_plan(self.in_proj_ba, p + "in_proj_ba.weight", (),
                                                           (fused_ba_rows(full, self.g0, G),)))
        elif not self.sharded:
            plan.update(self.in_proj_qkvz.weight_plan(p + "in_proj_qkv.weight", 0))
            plan.update(self.in_proj_qkvz.weight_plan(p + "in_proj_z.weight", 1))
            plan.update(self.in_proj_ba.weight_plan(p + "in_proj_b.weight", 0))
            plan.update(self.in_proj_ba.weight_plan(p + "in_proj_a.weight", 1))
        else:
            plan.update(self.in_proj_qkvz.weight_plan(p + "in_proj_qkv.weight", 0, (split_qkv_rows(full, self.g0, G),)))
            plan.update(self.in_proj_qkvz.weight_plan(p + "in_proj_z.weight", 1, value_heads))
            plan.update(self.in_proj_ba.weight_plan(p + "in_proj_b.weight", 0, heads))
            plan.update(self.in_proj_ba.weight_plan(p + "in_proj_a.weight", 1, heads))
        # conv1d.weight is [C, 1, W] on disk: read as [C, W] (the middle index 0 drops the channel-group dim); under
        # TP the rank's channels (its q, k, v runs) are read alone and the dim dropped after the read.
        if self.sharded:
            plan[p + "conv1d.weight"] = PlanEntry(Rearranged(self.conv_weight_CW, lambda t: t[:, 0]), (),
                                                  (split_qkv_rows(full, self.g0, G),))
            plan[p + "dt_bias"] = PlanEntry(self.dt_bias_N, (), heads)
            plan[p + "A_log"] = PlanEntry(self.A_log_N, (), heads)
        else:
            plan[p + "conv1d.weight"] = PlanEntry(self.conv_weight_CW, (), (slice(None), 0))
            plan[p + "dt_bias"] = PlanEntry(self.dt_bias_N, ())
            plan[p + "A_log"] = PlanEntry(self.A_log_N, ())
        plan[p + "norm.weight"] = PlanEntry(self.norm.weight, ())  # [V]: one weight every head shares
        plan.update(self.out_proj.weight_plan(p + "out_proj.weight"))
        return plan


__all__ = ["GatedDeltaNet", "GatedRMSNorm", "fused_ba_rows", "fused_qkvz_rows", "split_qkv_rows"]
