"""Kimi Delta Attention (KDA), the linear-attention token mixer of Kimi Linear: gated DeltaNet's states, convolution
and delta rule (gated_deltanet.py, whose step logic it inherits) with a decay per key channel, as transformers'
KimiLinearDeltaAttention computes it.

Per layer: q, k, v from three projections (stacked into one matmul here), a causal depthwise convolution (SiLU) over
q|k|v with each sequence's conv state; the forget gate g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), one value
per head and key channel (a low-rank projection through head_dim), in float32; the write strength beta =
sigmoid(b_proj(x)); the delta rule with g [T, H, K] (kernels/gated_delta.py); the output RMS-normed per head in
float32, times the weight and sigmoid(g_b(g_a(x))) (a low-rank output gate), then o_proj. Ling's hybrid
(KimiDeltaConfig's variants): full-rank gates (f_proj, g_proj) and a bounded "safe" forget gate, lower_bound *
sigmoid(exp(A_log) * x).

Under tensor parallelism a rank holds its heads: their rows of q/k/v, f_b, g_b, b and of the conv channels, dt_bias,
A_log; f_a and g_a (head_dim rows) whole; o_proj's columns (one all-reduce).

Legend: T tokens, D hidden, H heads (q/k and value alike), K head dim, C conv channels (3 H K), R conv kernel - 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .kimi_delta_config import KimiDeltaConfig
from ..tp.attention import shard_attention
from ..tp.group import TensorParallel
from ..tp.linear import ColumnParallel, RowParallel
from .gated_deltanet import GatedDeltaNet
from .layers import param
from .linear import FloatLinear, Linear, linear_method

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class SigmoidGatedRMSNorm(nn.Module):
    """RMSNorm over each head in float32, times the weight (float32) and sigmoid(gate), cast back once
    (transformers' KimiLinearRMSNormGated: the norm's product is not rounded to the activations' dtype)."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x_THK: torch.Tensor, gate_THK: torch.Tensor) -> torch.Tensor:
        x32 = x_THK.float()
        normed = self.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        return (normed * torch.sigmoid(gate_THK.float())).to(x_THK.dtype)


class KimiDeltaAttention(GatedDeltaNet):
    """One KDA layer (module docstring)."""

    def __init__(self, layer_idx: int, hidden_size: int, la: KimiDeltaConfig, rms_norm_eps: float, kernels: Kernels,
                 dtype, device=None, tp: TensorParallel | None = None, quant=None):
        nn.Module.__init__(self)
        full, size = la, (tp.size if tp is not None else 1)
        la = shard_attention(la, size)
        assert isinstance(la, KimiDeltaConfig)
        self.layer_idx, self.la, self.full, self.kernels = layer_idx, la, full, kernels
        self.kda = la  # the same config, typed as KDA's (its gates' variants)
        H, K = la.num_v_heads, la.head_k_dim
        self.key_dim = self.value_dim = H * K
        self.g0 = self.n0 = tp.rank * H if size > 1 else 0  # this rank's first head
        self.sharded = size > 1
        h0 = self.n0 * K
        col = ColumnParallel((h0, h0, h0), (H * K,) * 3) if size > 1 else None
        one = ColumnParallel((h0,), (H * K,)) if size > 1 else None
        heads = ColumnParallel((self.n0,), (H,)) if size > 1 else None
        row = RowParallel(tp, h0, H * K) if size > 1 else None
        f = dict(dtype=dtype, device=device)
        # quant (engine/config/quantization.py's config, None = float): q/k/v and o_proj run FP8 where it quantizes
        # them (as `moelink quantize-fp8` and DeepSeek-style releases do); the gates and b_proj are held float, a
        # checkpoint's FP8 ones dequantized as they load (engine/rank/fp8_linears.py).
        p = f"model.layers.{layer_idx}.self_attn."
        self.qkv_proj = Linear(hidden_size, (H * K,) * 3, linear_method(quant, p + "q_proj", p + "k_proj", p + "v_proj"),
                               kernels, **f, parallel=col)
        self.conv_weight_CW = param(la.conv_dim, la.conv_kernel, **f)
        if la.forget_gate == "low_rank":  # through head_dim, whole on every rank, then this rank's heads' rows
            self.f_a_proj = Linear(hidden_size, K, FloatLinear(), kernels, **f)
            self.f_b_proj = Linear(K, H * K, FloatLinear(), kernels, **f, parallel=one)
        else:
            self.f_proj = Linear(hidden_size, H * K, FloatLinear(), kernels, **f, parallel=one)
        self.dt_bias_HK = nn.Parameter(torch.empty(H * K, dtype=torch.float32, device=device), requires_grad=False)
        self.A_log_H = param(H, dtype=torch.float32 if la.a_log_float32 else dtype, device=device)
        self.b_proj = Linear(hidden_size, H, FloatLinear(), kernels, **f, parallel=heads)
        if la.output_gate == "low_rank":
            self.g_a_proj = Linear(hidden_size, K, FloatLinear(), kernels, **f)
            self.g_b_proj = Linear(K, H * K, FloatLinear(), kernels, **f, parallel=one)
        else:
            self.g_proj = Linear(hidden_size, H * K, FloatLinear(), kernels, **f, parallel=one)
        self.norm = SigmoidGatedRMSNorm(K, rms_norm_eps, dtype, device)
        self.out_proj = Linear(H * K, hidden_size, linear_method(quant, p + "o_proj"), kernels, **f, parallel=row)

    def project(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        la, T, H, K = self.kda, x_TD.shape[0], self.la.num_v_heads, self.la.head_k_dim
        f_TX = self.f_b_proj(self.f_a_proj(x_TD)) if la.forget_gate == "low_rank" else self.f_proj(x_TD)
        f_THK = (f_TX.float() + self.dt_bias_HK.float()).view(T, H, K)
        rate_H1 = self.A_log_H.float().exp()[:, None]
        if la.gate_lower_bound is not None:  # Ling's safe gate, bounded in [lower_bound, 0]
            g_THK = la.gate_lower_bound * torch.sigmoid(rate_H1 * f_THK)
        else:  # transformers' softplus, threshold included (log(1 + exp(x)) below 20, x above), in float32
            g_THK = -rate_H1 * torch.where(f_THK > 20.0, f_THK, torch.log(1.0 + torch.exp(f_THK)))
        if la.decay_in_model_dtype:
            g_THK = g_THK.to(x_TD.dtype)
        beta_TH = torch.sigmoid(self.b_proj(x_TD))
        gate_TX = self.g_b_proj(self.g_a_proj(x_TD)) if la.output_gate == "low_rank" else self.g_proj(x_TD)
        return self.qkv_proj(x_TD).contiguous(), g_THK, beta_TH, gate_TX.view(T, H, K)

    def finish(self, o_THK: torch.Tensor, gate_THK: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(o_THK, gate_THK).reshape(o_THK.shape[0], self.value_dim))

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.self_attn."); under TP this rank's heads' rows only."""
        full, H, K = self.full, self.la.num_v_heads, self.la.head_k_dim
        plan: WeightPlan = {}
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            plan.update(self.qkv_proj.weight_plan(f"{p}{name}.weight", i))
        gates = (("f_a_proj", "f_b_proj") if self.kda.forget_gate == "low_rank" else ("f_proj",)) + (
            ("g_a_proj", "g_b_proj") if self.kda.output_gate == "low_rank" else ("g_proj",))
        for name in gates + ("b_proj", "o_proj"):
            plan.update(getattr(self, "out_proj" if name == "o_proj" else name).weight_plan(f"{p}{name}.weight"))
        channels = (torch.arange(self.n0 * K, (self.n0 + H) * K),)
        # The published checkpoint keeps q's, k's and v's convolutions apart ([H K, 1, W] each): each fills its run
        # of the conv channels (this rank's heads' channels under TP).
        rows = slice(self.n0 * K, (self.n0 + H) * K) if self.sharded else slice(None)
        for j, name in enumerate(("q_conv1d", "k_conv1d", "v_conv1d")):
            plan[f"{p}{name}.weight"] = PlanEntry(self.conv_weight_CW, (slice(j * H * K, (j + 1) * H * K),), (rows, 0))
        plan[p + "dt_bias"] = PlanEntry(self.dt_bias_HK, (), channels if self.sharded else ())
        # A_log: [1, 1, H, 1] (Kimi Linear) or [H] (Ling), read whole (H values) and cut to this rank's heads.
        n0 = self.n0
        plan[p + "A_log"] = PlanEntry(Rearranged(self.A_log_H, lambda t: t.reshape(-1)[n0:n0 + H]), ())
        plan[p + "o_norm.weight"] = PlanEntry(self.norm.weight, ())  # [K]: one weight every head shares
        return plan


__all__ = ["KimiDeltaAttention", "SigmoidGatedRMSNorm"]
