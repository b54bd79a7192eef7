"""Grouped-query attention over the paged K/V cache (Qwen3-MoE, Mixtral, GLM-4-MoE, gpt-oss, MiniMax-M2,
MiMo-V2-Flash).

Legend: T tokens in the flat batch, D hidden, N query heads, K kv heads, H q/k head dim, Hv value head dim (H
unless GQAConfig.v_head_dim says otherwise), Q = N * H, KH = K * H.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.kernels.attention import FP8_CACHE_DTYPES
from moelink.kernels.attention_chunks import chunked_metadata
from moelink.moe.fp8_input import Fp8Input
from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .gqa_config import GQAConfig
from .gqa_input import FusedInput
from ..tp.attention import kv_head_start, shard_attention
from ..tp.group import TensorParallel
from ..tp.linear import ColumnParallel, RowParallel
from .layers import ForwardContext, RMSNorm, param
from .linear import Linear, keeps_blocks, linear_method
from .rope import RotaryEmbedding, deinterleave_rows

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class GQAAttention(nn.Module):
    """q, k, v projections stacked into one matmul (qkv_proj, and qkv_bias when the checkpoint has biases);
    optional q/k RMSNorm before rotary, per head (Qwen3; GLM's use_qk_norm: fused into the rotary + KV-write op)
    or over all heads at once (MiniMax-M2: the [T, N * H] and [T, K * H] projections normed before they split
    into heads); rotary over the first rope.rotary_dim dims of each head (all of them, or a partial prefix), or
    none on a NoPE layer (EXAONE-MoE's full-attention layers); an interleaved rope (ERNIE-4.5) runs as neox on rows
    de-interleaved at load (`rope_rows`); q, k and v optionally clamped before rotary (OLMoE's
    and DBRX's clip_qkv).
    gpt-oss adds an o_proj bias, per-head attention sinks and, on its sliding layers, a window: both go to the
    attention kernel as per-layer arguments (a Python int and a parameter: nothing per step, so decode graphs
    capture them). MiMo-V2-Flash's values are v_head_dim wide (the V cache, the output and o_proj's input too)
    and scaled by value_scale before they are cached, as transformers scales them."""

    def __init__(self, layer_idx: int, hidden_size: int, attn: GQAConfig, rms_norm_eps: float, rope: RotaryEmbedding,
                 kernels: Kernels, dtype, device=None, quant=None, *, in_features: int | None = None,
                 sinks_name: str = "sinks", tp: TensorParallel | None = None):
        """in_features: the width q/k/v are projected from, when it is not hidden_size (an EAGLE-3 head's
        [embedding | hidden] concatenation, 2 * hidden_size, engine/spec/heads/eagle3.py); o_proj returns hidden_size.
        sinks_name: the sinks' checkpoint name under self_attn. (ArchSpec.sinks).
        tp: the rank's TensorParallel (engine/tp/group.py; None: whole): this rank holds num_heads / size query
        heads (their sinks, their output gates) and its kv heads (engine/tp/attention.shard_attention),
        qkv_proj is column-parallel, o_proj row-parallel (its bias added once, after the all-reduce); an all-heads
        q/k norm holds its heads' part of the weights and all-reduces its mean square (`_all_heads_norm`)."""
        super().__init__()
        size = tp.size if tp is not None else 1
        full, attn = attn, shard_attention(attn, size)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.v_head_dim = attn.value_head_dim
        self.q_size, self.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        self.v_size, self.o_size = attn.num_kv_heads * self.v_head_dim, attn.num_heads * self.v_head_dim
        self.value_scale = float(attn.value_scale)
        self.clip_qkv = float(attn.clip_qkv) if attn.clip_qkv is not None else None
        self.scale = attn.softmax_scale
        self.kernels = kernels
        self.rope = rope
        # An interleaved rope (ERNIE-4.5: pairs (2i, 2i + 1)) runs as the neox one on q/k rows de-interleaved per
        # head at load (`rope_rows`): q . k is unchanged by one permutation of both, and v is not touched.
        self.interleaved = attn.rope.style == "interleaved"
        self.full_heads = (attn.num_heads * size, full.num_kv_heads)  # the checkpoint's q and kv heads (TP: all)
        # quant: engine/config/quantization.py's config (None = float); the method is chosen by checkpoint name.
        p = f"model.layers.{layer_idx}.self_attn."
        qkv_method = linear_method(quant, p + "q_proj", p + "k_proj", p + "v_proj")
        # With an output gate (Qwen3-Next) q_proj's rows hold each head's query then its gate: read as [queries |
        # gates] (gate_rows), so the first piece splits into two contiguous halves.
        self.output_gate = attn.output_gate
        if attn.output_gate:  # that regrouping moves rows across FP8 blocks: the stack is held float (keeps_blocks)
            qkv_method = keeps_blocks(qkv_method, (gate_rows(attn.num_heads * size, attn.head_dim, size),))
        q_rows = 2 * self.q_size if attn.output_gate else self.q_size
        col = row = None
        self.q_head0, self.kv_head0, self.tp = 0, 0, tp if size > 1 else None
        if size > 1:  # this rank's heads: query heads [r N/size, ...), kv heads from kv_head_start
            q0 = tp.rank * attn.num_heads
            k0 = kv_head_start(tp.rank, size, full.num_kv_heads)
            # A gated q_proj holds 2H rows per head, so this rank's heads start at row q0 * 2H (read in gate_rows'
            # per-rank order: its heads' rows are one contiguous range of the checkpoint).
            q_row0 = q0 * attn.head_dim * (2 if attn.output_gate else 1)
            col = ColumnParallel((q_row0, k0 * attn.head_dim, k0 * self.v_head_dim),
                                 (q_rows, self.kv_size, self.v_size))
            row = RowParallel(tp, q0 * self.v_head_dim, self.o_size)
            self.q_head0, self.kv_head0 = q0, k0
        self.qkv_proj = Linear(in_features or hidden_size, (q_rows, self.kv_size, self.v_size), qkv_method,
                               kernels, dtype, device, parallel=col)
        # Zeros: FP8 gaps between the pieces (linear.py) get no bias from the checkpoint.
        self.qkv_bias = (nn.Parameter(torch.zeros(self.qkv_proj.rows, dtype=dtype, device=device), requires_grad=False)
                         if attn.qkv_bias else None)
        self.o_proj = Linear(self.o_size, hidden_size, linear_method(quant, p + "o_proj"), kernels, dtype, device,
                             parallel=row)
        self.o_bias = param(hidden_size, dtype=dtype, device=device) if attn.o_bias else None
        self.sinks_N = param(attn.num_heads, dtype=dtype, device=device) if attn.sinks else None
        self.sliding_window = attn.window(layer_idx)
        self.rotary = attn.rotates(layer_idx)  # False: a NoPE layer (GQAConfig.nope_layers)
        # The fp8 KV cache's per-layer scales (stored = k / k_scale): 1.0, as vLLM runs a checkpoint that ships
        # none; e4m3 covers ±448 with steps of 2^-9 near zero, ample for normed, roped keys and values.
        self.k_scale = self.v_scale = 1.0
        # "per_head": one [H] weight each, in the fused op; "all_heads": [N * H] / [K * H] weights, before the split.
        self.all_heads_norm = attn.qk_norm == "all_heads"
        q_norm, k_norm = (self.q_size, self.kv_size) if self.all_heads_norm else (attn.head_dim, attn.head_dim)
        self.q_norm = RMSNorm(q_norm, rms_norm_eps, kernels, dtype, device) if attn.qk_norm else None
        self.k_norm = RMSNorm(k_norm, rms_norm_eps, kernels, dtype, device) if attn.qk_norm else None
        # "l2" (Llama 4): the per-head norm without a weight, run as that norm with a weight of ones that no checkpoint
        # tensor fills (weight_plan leaves it out). transformers norms after the rotary; a rotation keeps each
        # head's mean square, so norming before it (as the fused op does) is the same.
        self.l2_norm = attn.qk_norm == "l2"
        # HunYuan-MoE-V1 norms the rotated q and k (GQAConfig.qk_norm_after_rope): the ops one by one, never fused.
        self.norm_after_rope = attn.qk_norm_after_rope
        if self.q_norm is not None and self.k_norm is not None and self.l2_norm:
            with torch.no_grad():
                self.q_norm.weight.fill_(1.0)
                self.k_norm.weight.fill_(1.0)
        # Chunked local attention (GQAConfig.attention_chunk_size): the attention reads the step's metadata as one
        # virtual sequence per chunk (kernels/attention_chunks.py). None: causal over the whole context.
        self.attention_chunk = attn.attention_chunk_size
        # Attention temperature tuning (GQAConfig.temperature_tuning): (floor_scale, attn_scale), or None.
        self.temperature_tuning = attn.temperature_tuning
        self.sinks_name = sinks_name
        # A decode batch's norm, projection and rope_write_kv in one launch where the layer allows it (None: never).
        plain = type(self)._attend is GQAAttention._attend and type(self).forward is GQAAttention.forward
        # Gemma 4's weightless value norm (GQAConfig.v_norm, eps rms_norm_eps) and k_proj read into the v rows
        # (value_from_key): the fused decode input writes v as projected, so such a layer never takes it.
        self.v_norm_eps = rms_norm_eps if attn.v_norm else None
        self.value_from_key = attn.value_from_key
        self.fusion = FusedInput.for_layer(self, hidden_size, device, plain) if not attn.v_norm else None

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x_TD.shape[0]
        q_TQ, k_TK, v_TK = self.qkv_proj.split(self.qkv_proj(x_TD, self.qkv_bias))
        gate_TQ = None
        if self.output_gate:
            q_TQ, gate_TQ = q_TQ[:, :self.q_size], q_TQ[:, self.q_size:]
        if self.all_heads_norm:  # the whole projection's mean square, as transformers norms before the reshape
            q_TQ, k_TK = self._all_heads_norm(q_TQ, k_TK)
        if self.clip_qkv is not None:  # OLMoE / DBRX: after the norm, before rotary (element-wise: any TP shard)
            c = self.clip_qkv
            q_TQ, k_TK, v_TK = q_TQ.clamp(-c, c), k_TK.clamp(-c, c), v_TK.clamp(-c, c)
        if self.value_scale != 1.0:
            v_TK = v_TK * self.value_scale
        q_TNH = q_TQ.view(T, self.num_heads, self.head_dim)
        k_TKH = k_TK.view(T, self.num_kv_heads, self.head_dim)
        v_TKH = v_TK.view(T, self.num_kv_heads, self.v_head_dim)
        if self.v_norm_eps is not None:  # Gemma 4's v_norm: no weight, float32, cast back
            v32 = v_TKH.float() if v_TKH.dtype.itemsize < 4 else v_TKH
            v_TKH = (v32 * torch.pow(v32.pow(2).mean(-1, keepdim=True) + self.v_norm_eps, -0.5)).to(v_TKH.dtype)
        head_norm = self.q_norm is not None and not self.all_heads_norm
        k_cache, v_cache, attn, kv_scales, rope_pos_T, table_PR = self._step_args(positions_T, ctx)
        if self.rope.style == "neox" and self.rotary and not self.norm_after_rope:
            # q/k norms, rotary and the KV write in one op (one Triton launch; reference: kernels/rotary.py).
            norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if head_norm else ()
            q_TNH = self.kernels.rope_write_kv(q_TNH, k_TKH, v_TKH, rope_pos_T, table_PR, k_cache, v_cache,
                                               attn.slot_mapping_T, *norm, **kv_scales)
        else:  # no rotary (a NoPE layer), a rope style the fused op does not rotate, or a norm after the rotary:
            # the ops one by one
            if head_norm and not self.norm_after_rope:
                q_TNH, k_TKH = self.q_norm(q_TNH), self.k_norm(k_TKH)  # type: ignore[misc]  # head_norm: both set
            if self.rotary:
                q_TNH, k_TKH = self.rope(q_TNH, k_TKH, rope_pos_T, table_PR)
            if head_norm and self.norm_after_rope:
                q_TNH, k_TKH = self.q_norm(q_TNH), self.k_norm(k_TKH)  # type: ignore[misc]  # head_norm: both set
            self.kernels.write_kv(k_TKH.contiguous(), v_TKH.contiguous(), k_cache, v_cache, attn.slot_mapping_T,
                                  **kv_scales)
        o_TO = self._heads_out(q_TNH.contiguous(), x_TD, positions_T, ctx, attn, kv_scales, gate_TQ)
        return self.o_proj(o_TO, self.o_bias)

    def forward_fused(self, norm: RMSNorm, post_norm: RMSNorm | None, positions_T: torch.Tensor, x_TD: torch.Tensor,
                      residual_TD: torch.Tensor | None, ctx: ForwardContext, handoff: Fp8Input | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(norm(x + residual)), x + residual) with the norm, the projection and rope_write_kv in one
        launch (kernels.norm_qkv_rope_kv); with `post_norm`, o_proj, the residual add and that norm in one more
        (kernels.linear_add_rms_norm; FusedOutput.project: with the FP8 experts' `handoff`, their quantized
        input too), returning (post_norm(out + sum), out + sum), the FFN block's input. Only
        where `fusion.takes` the step (and `takes_output`, with post_norm): engine/models/gqa_input.py
        (plain GQA, whose `_attend` does not read the normed input)."""
        fused = self.fusion
        assert fused is not None  # the caller asked fusion.takes
        k_cache, v_cache, attn, kv_scales, rope_pos_T, table_PR = self._step_args(positions_T, ctx)
        qn, kn = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        q_TNH, residual_TD = self.kernels.norm_qkv_rope_kv(
            x_TD, residual_TD, norm.weight, norm.eps, self.qkv_proj.weight, self.qkv_bias, self.num_heads,
            self.num_kv_heads, self.v_head_dim, rope_pos_T, table_PR, k_cache, v_cache, attn.slot_mapping_T,
            q_norm_H=qn, k_norm_H=kn, eps=self.q_norm.eps if self.q_norm is not None else 1e-6,
            k_scale=self.k_scale, v_scale=self.v_scale, counters_G=fused.counters_G, **fused.weight())
        o_TO = self._heads_out(q_TNH, x_TD, positions_T, ctx, attn, kv_scales, None)
        if post_norm is None:
            return self.o_proj(o_TO, self.o_bias), residual_TD
        return fused.output.project(self.kernels, o_TO, self.o_bias, residual_TD, post_norm, handoff)

    def _step_args(self, positions_T: torch.Tensor, ctx: ForwardContext):
        """(k_cache, v_cache, the attention metadata this layer reads, the fp8 cache's scales as keywords, the
        rotary positions, the rotary table) of this step."""
        k_cache, v_cache = ctx.kv_caches[self.layer_idx][:2]
        # A sliding layer reads its group's own table when it has one (its tensors are shared with a full layer).
        attn = ctx.attn_sliding if self.sliding_window is not None and ctx.attn_sliding is not None else ctx.attn
        fp8 = k_cache.dtype in FP8_CACHE_DTYPES
        kv_scales = dict(k_scale=self.k_scale, v_scale=self.v_scale) if fp8 else {}
        # A step with image tokens rotates by 3-D positions: each token its own table row (engine/models/rope.py).
        rope_pos_T, table_PR = self.rope.positions_and_table(
            positions_T, ctx.images.mrope_3T if ctx.images is not None else None)
        return k_cache, v_cache, attn, kv_scales, rope_pos_T, table_PR

    def _heads_out(self, q_TNH: torch.Tensor, x_TD: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext,
                   attn, kv_scales: dict, gate_TQ: torch.Tensor | None) -> torch.Tensor:
        """The attention and its output gate where the layer has one: o_proj's input, [T, N * Hv]."""
        if self.temperature_tuning is not None:
            q_TNH = self._tuned(q_TNH, positions_T)
        o_TO = self._attend(q_TNH, x_TD, positions_T, ctx, attn, kv_scales).reshape(q_TNH.shape[0], self.o_size)
        return o_TO if gate_TQ is None else o_TO * torch.sigmoid(gate_TQ)

    def _attend(self, q_TNH: torch.Tensor, x_TD: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext,
                attn, kv_scales: dict) -> torch.Tensor:
        """The attention itself, over the paged cache this step's K/V are written to: [T, N, Hv] (a kind built on
        GQA attends its own way: block-sparse attention, engine/models/block_sparse.py)."""
        k_cache, v_cache = ctx.kv_caches[self.layer_idx][:2]
        if self.attention_chunk is not None:  # each chunk a virtual sequence of its own (plain causal within it)
            attn = chunked_metadata(attn, self.attention_chunk, k_cache.shape[1])
        return self.kernels.paged_attention(q_TNH, k_cache, v_cache, attn, self.scale, **self._extras(), **kv_scales)

    def _tuned(self, q_TNH: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """q times Llama 4's attention temperature at each token's position, log1p(floor((p + 1) / floor_scale)) *
        attn_scale + 1, computed in float32 and the product cast back to q's dtype, as transformers does."""
        floor_scale, attn_scale = self.temperature_tuning  # type: ignore[misc]  # set by the caller's test
        scale_T = torch.log1p(torch.floor((positions_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0
        return (q_TNH * scale_T[:, None, None]).to(q_TNH.dtype)

    def _all_heads_norm(self, q_TQ: torch.Tensor, k_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniMax-M2's q/k RMSNorm over every head. Under TP a rank holds some heads, so their mean square is a
        part of the whole: the ranks' [T, 2] mean squares (q's, k's, in float32 as the norm kernel) are all-reduced
        once and divided by the group size, as vLLM's MiniMax-M2 does. Equal widths per rank make that the whole
        mean square, k's too when its heads are replicated (K < size: each of the K heads counted size / K times
        over size * H columns)."""
        if self.tp is None:
            return self.q_norm(q_TQ), self.k_norm(k_TK)  # type: ignore[misc]  # all_heads_norm: both set
        q32_TQ, k32_TK = q_TQ.float(), k_TK.float()
        ms_T2 = torch.stack([q32_TQ.pow(2).mean(-1), k32_TK.pow(2).mean(-1)], dim=-1)
        ms_T2 = self.tp.all_reduce(ms_T2) / self.tp.size
        q_TQ = self.q_norm.weight * (q32_TQ * torch.rsqrt(ms_T2[:, :1] + self.q_norm.eps)).to(q_TQ.dtype)
        k_TK = self.k_norm.weight * (k32_TK * torch.rsqrt(ms_T2[:, 1:] + self.k_norm.eps)).to(k_TK.dtype)
        return q_TQ, k_TK

    def _extras(self) -> dict:
        """Only the attention arguments this layer has, so kernel strategies without them keep their signature."""
        extras = {}
        if self.sinks_N is not None:
            extras["sinks_N"] = self.sinks_N
        if self.sliding_window is not None:
            extras["sliding_window"] = self.sliding_window
        return extras

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.self_attn.") → (parameter, index)."""
        plan = {}
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            size = self.tp.size if self.tp is not None else 1
            rows: tuple = ()
            if i == 0 and self.output_gate:
                rows = (gate_rows(self.num_heads * size, self.head_dim, size),)
            elif i < 2 and self.interleaved:
                rows = (rope_rows(self.full_heads[i], self.head_dim, self.rope.rotary_dim),)
            if self.value_from_key and i == 2:  # no v_proj: k_proj's weight fills the v rows too (below)
                continue
            plan.update(self.qkv_proj.weight_plan(f"{p}{name}.weight", i, rows))
            if self.value_from_key and i == 1:
                plan[f"{p}k_proj.weight"] = _key_and_value(plan[f"{p}k_proj.weight"], self.qkv_proj, self.tp)
            if self.qkv_bias is not None and self.value_from_key and i == 1:
                kb = self.qkv_bias[self.qkv_proj.piece_rows(1).start:self.qkv_proj.piece_rows(2).stop]
                plan[f"{p}k_proj.bias"] = PlanEntry(Rearranged(kb, lambda t: torch.cat([t, t]),
                                                               ((kb.shape[0] // 2,), kb.dtype)), ())
                continue
            if self.qkv_bias is not None:  # this rank's rows of the bias too (the weight's source, as a vector)
                plan[f"{p}{name}.bias"] = PlanEntry(self.qkv_bias, (self.qkv_proj.piece_rows(i),),
                                                    self.qkv_proj.parallel.source(i, rows))
        plan.update(self.o_proj.weight_plan(p + "o_proj.weight"))
        if self.o_bias is not None:
            plan[p + "o_proj.bias"] = PlanEntry(self.o_bias, ())
        if self.sinks_N is not None:  # this rank's heads' sinks
            heads = (slice(self.q_head0, self.q_head0 + self.num_heads),) if self.tp is not None else ()
            plan[p + self.sinks_name] = PlanEntry(self.sinks_N, (), heads)
        if self.q_norm is not None and not self.l2_norm:  # (an "l2" norm has no weight in the checkpoint)
            q_src = k_src = ()
            if self.all_heads_norm and self.tp is not None:  # [N * H] / [K * H] weights: this rank's heads' part
                q0, k0 = self.q_head0 * self.head_dim, self.kv_head0 * self.head_dim
                q_src, k_src = (slice(q0, q0 + self.q_size),), (slice(k0, k0 + self.kv_size),)
            plan[p + "q_norm.weight"] = PlanEntry(self.q_norm.weight, (), q_src)
            plan[p + "k_norm.weight"] = PlanEntry(self.k_norm.weight, (), k_src)
        return plan


def _key_and_value(entry: PlanEntry, proj: Linear, tp: TensorParallel | None) -> PlanEntry:
    """k_proj's plan entry widened to fill the k and the v rows of the stack with it (GQAConfig.value_from_key): the
    two pieces are adjacent rows of a float weight, filled as one view with the tensor read twice."""
    k, v = proj.piece_rows(1), proj.piece_rows(2)
    if tp is not None or not isinstance(entry.dest, torch.Tensor) or entry.index != (k,) or k.stop != v.start:
        raise ValueError("attention_k_eq_v (k_proj read as the values too) is supported on float weights on one "
                         "rank only.")
    w = entry.dest[k.start:v.stop]
    return PlanEntry(Rearranged(w, lambda t: torch.cat([t, t]), ((k.stop - k.start, w.shape[1]), w.dtype)), (),
                     entry.source)


def rope_rows(num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """q_proj's (or k_proj's) rows with each head's rotated prefix de-interleaved ([0, 2, ..., 1, 3, ...]: rope.
    deinterleave_rows), its other dims in place: an interleaved rope then rotates as neox. Within each head, so a TP
    rank's heads are still one contiguous range (and FP8 rows stay in their blocks when head_dim is a multiple)."""
    one = torch.cat([deinterleave_rows(rotary_dim), torch.arange(rotary_dim, head_dim)])
    return (torch.arange(num_heads)[:, None] * head_dim + one[None, :]).reshape(-1)


def gate_rows(num_heads: int, head_dim: int, groups: int = 1) -> torch.Tensor:
    """q_proj's rows of a gated attention (per head: H query rows, then H gate rows) as [every query | every gate]
    of each of `groups` equal runs of heads, run after run: a TP rank's heads are one run, so its rows (cut by
    ColumnParallel) are one contiguous range of the checkpoint, read alone."""
    per = num_heads // groups
    base = torch.arange(per)[:, None] * 2 * head_dim
    dims = torch.arange(head_dim)
    one = torch.cat([(base + dims).reshape(-1), (base + head_dim + dims).reshape(-1)])
    return (torch.arange(groups)[:, None] * per * 2 * head_dim + one[None, :]).reshape(-1)
