"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) over the paged latent cache, absorbed for every token.

Legend: T tokens in the flat batch, D hidden, N heads, Q q_lora_rank, C kv_lora_rank, P qk_rope_head_dim,
Dn qk_nope_head_dim, Dv v_head_dim, R = C + P (kv_a_proj_with_mqa's rows).

Per token (as transformers' DeepseekV3Attention): q = q_b_proj(q_a_layernorm(q_a_proj(x))), or q_proj(x)
when q_lora_rank is null, split per head into q_nope [Dn] and q_pe [P]; kv_a_proj_with_mqa(x) = [c_kv (C) |
k_pe (P)], c_kv normalised by kv_a_layernorm; q_pe and k_pe roped. kv_b_proj [N * (Dn + Dv), C], viewed
[N, Dn + Dv, C], holds W_UK [N, Dn, C] and W_UV [N, Dv, C]: W_UK folds into the query (q_latent = q_nope @
W_UK) and W_UV into the output (o = out_latent @ W_UV^T), so attention runs over the cached rows [c_kv | k_pe]
(kernels/mla.py has the algebra) and no per-head K or V ever exists.

Why absorbed for prefill chunks too: the latent cache is the only K/V there is, so one code path serves
decode tokens, prefill chunks and chunks over a cached prefix in the same batch (the kernels take mixed
batches); expanding K/V per head for long prompts is an optimisation for later, not a second semantics.
Decode is graph-safe: only device tensors and the kernels' device-side lengths, no host sync.

DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5: MLAConfig.indexer): the layer's lightning indexer (dsa.py) writes its
keys into the layer's second cache tensor and selects index_topk positions per query from the q latent; attention
then runs over those rows only (kernels.sparse_mla_attention), or dense when no query sees more (the same tokens).
A GLM-5 "shared" layer has no indexer and attends to the positions of the last one (ForwardContext.dsa_topk).

Hunyuan Hy4 adds a learned sink logit per head to every softmax (MLAConfig.sinks: the kernels' sinks_N) and an
element-wise sigmoid gate on the attention output (MLAConfig.output_gate_values).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.kernels.attention import FP8_CACHE_DTYPES
from moelink.moe.fp8_input import Fp8Input
from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .mla_config import MLAConfig
from ..tp.attention import shard_attention
from ..tp.group import TensorParallel
from ..tp.linear import ColumnParallel, RowParallel
from .dsa import LightningIndexer
from .fused_output import FusedOutput
from .layers import ForwardContext, RMSNorm, param
from .linear import FloatLinear, Linear, keeps_blocks, linear_method
from .rope import RotaryEmbedding, deinterleave_rows

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not config.rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    def __init__(self, layer_idx: int, hidden_size: int, attn: MLAConfig, rope: RotaryEmbedding, kernels: Kernels,
                 dtype, device=None, quant=None, max_model_len: int = 1, tp: TensorParallel | None = None):
        """tp: the rank's TensorParallel (None: whole). Under TP each rank holds num_heads / size heads, as vLLM and
        SGLang split MLA: q_b_proj and kv_b_proj column-parallel by head, o_proj row-parallel; the fused
        q_a / kv_a projection (latent and roped key, every head's) and the latent cache are whole on every rank.
        Without q LoRA (DeepSeek-V2-Lite) the fused projection stacks q_proj, which is per head: its q piece is
        this rank's heads' rows, its kv_a piece whole. DeepSeek Sparse Attention's indexer is whole on every rank
        (dsa.py: why)."""
        super().__init__()
        size = tp.size if tp is not None else 1
        attn = shard_attention(attn, size)
        self.layer_idx, self.attn, self.kernels, self.rope = layer_idx, attn, kernels, rope
        h0 = tp.rank * attn.num_heads if size > 1 else 0  # this rank's first (global) head
        self.head0, self.tp_size = h0, size
        qb = kvb = o = fused = None
        N, C, P = attn.num_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
        if size > 1:
            X, Dv = attn.qk_head_dim, attn.v_head_dim
            qb = ColumnParallel((h0 * X,), (attn.num_heads * X,))
            if attn.q_lora_rank is None:  # q_proj by head, stacked with kv_a_proj_with_mqa read whole (rows 0..C+P)
                fused = ColumnParallel((h0 * X, 0), (N * X, C + P))
            kvb = ColumnParallel((h0 * (attn.qk_nope_head_dim + Dv),), (attn.num_heads * (attn.qk_nope_head_dim + Dv),))
            o = RowParallel(tp, h0 * Dv, attn.num_heads * Dv)
        self.q_rows = attn.q_lora_rank if attn.q_lora_rank is not None else N * attn.qk_head_dim
        f = dict(dtype=dtype, device=device)
        # x feeds two projections, q's first (q_a_proj, or q_proj) and kv_a_proj_with_mqa: one matmul over
        # their stacked rows [q rows | c_kv (C) | k_pe (P)] (an FP8 gap before c_kv when q's rows end mid-block).
        # quant: engine/config/quantization.py's config (None = float); each linear's method by its checkpoint name.
        p = f"model.layers.{layer_idx}.self_attn."
        q_first = p + ("q_a_proj" if attn.q_lora_rank is not None else "q_proj")
        fused_method = linear_method(quant, q_first, p + "kv_a_proj_with_mqa")
        qb_method = linear_method(quant, p + "q_b_proj")
        if not attn.rope_in_checkpoint:
            if attn.q_lora_rank is None:
                raise ValueError(f"layer {layer_idx}: MLA without a rope part in the checkpoint (qk_rope_head_dim 0) "
                                 "needs a q_lora_rank (config.json q_lora_rank is null).")
            # The NoPE rows move into a zero-padded layout with a rope part, which FP8 blocks cannot follow: these
            # projections are held float, an FP8 checkpoint's dequantized as they load (engine/rank/fp8_linears.py).
            fused_method = qb_method = FloatLinear()
        else:  # a row order that moves rows across FP8 blocks (the rope de-interleave) holds the weight float too
            q_order, kv_order = self._row_orders(attn, size)
            fused_method = keeps_blocks(fused_method, *kv_order, *(() if attn.q_lora_rank is not None else q_order))
            qb_method = keeps_blocks(qb_method, *q_order)
        self.fused_a_proj = Linear(hidden_size, (self.q_rows, C + P), fused_method, kernels, **f, parallel=fused)
        # attention_bias puts biases on q_a_proj and kv_a_proj_with_mqa (never q_proj): zeros where none loads.
        self.fused_a_bias = (nn.Parameter(torch.zeros(self.fused_a_proj.rows, **f), requires_grad=False)
                             if attn.attention_bias else None)
        if attn.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(attn.q_lora_rank, _LATENT_NORM_EPS, kernels, dtype, device)
            self.q_b_proj = Linear(attn.q_lora_rank, N * attn.qk_head_dim, qb_method, kernels, **f, parallel=qb)
        self.kv_a_layernorm = RMSNorm(C, _LATENT_NORM_EPS, kernels, dtype, device)
        # Absorbed into the query and the output (never applied to activations): an FP8 kv_b_proj is
        # dequantized once at load.
        self.kv_b_proj = Linear(C, N * (attn.qk_nope_head_dim + attn.v_head_dim), linear_method(quant, p + "kv_b_proj"),
                                kernels, **f, dequantize_after_load=True, parallel=kvb)
        self.o_proj = Linear(N * attn.v_head_dim, hidden_size, linear_method(quant, p + "o_proj"), kernels, **f,
                             parallel=o)
        self.o_bias = param(hidden_size, **f) if attn.attention_bias else None
        # MLAConfig.output_gate: sigmoid(g_proj(x)) per head, or per value with output_gate_values (Hy4's [N * Dv, D]
        # gate_proj); this rank's heads' rows under TP.
        G = N * attn.v_head_dim if attn.output_gate_values else N
        g0 = h0 * attn.v_head_dim if attn.output_gate_values else h0
        self.g_proj = (Linear(hidden_size, G, linear_method(quant, p + "g_proj"), kernels, **f,
                              parallel=ColumnParallel((g0,), (G,)) if size > 1 else None)
                       if attn.output_gate else None)
        # MLAConfig.sinks: a float32 sink logit per head (this rank's heads), in the kernels' softmax denominators.
        self.sinks_N = param(N, dtype=torch.float32, device=device) if attn.sinks else None
        self.kv_scale = 1.0  # the fp8 latent cache's per-layer scale (as GQAAttention.k_scale)
        self.q_out_scale = 1.0  # MLAConfig.q_scale where q_b_proj is quantized (process_weights_after_loading)
        # DeepSeek Sparse Attention: this layer's lightning indexer (engine/models/dsa.py), None in a dense MLA layer and
        # in a GLM-5 "shared" layer, which attends to the positions the previous indexer chose (ctx.dsa_topk).
        if not attn.rope_in_checkpoint:  # GLM-5.3-Flash: the rope part held as zeros (MLAConfig.rope_in_checkpoint)
            with torch.no_grad():
                self.fused_a_proj.weight.zero_()
                self.q_b_proj.weight.zero_()
        ix = attn.indexer
        self.sparse = ix is not None
        self.indexer = (LightningIndexer(layer_idx, hidden_size, attn.q_lora_rank, ix, rope, kernels, dtype, device,
                                         quant, max_model_len) if ix is not None and not ix.shared else None)
        # A decode batch's o_proj, residual add and the FFN block's norm in one launch (engine/models/fused_output.py;
        # None: never). A subclass that projects its own way keeps the plain path.
        plain = type(self).forward is MLAAttention.forward and type(self)._heads_out is MLAAttention._heads_out
        self.fusion = FusedOutput.for_mixer(kernels, self.o_proj, device, plain)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.o_proj(self._heads_out(positions_T, x_TD, ctx), self.o_bias)

    def forward_fused(self, norm: RMSNorm, post_norm: RMSNorm | None, positions_T: torch.Tensor, x_TD: torch.Tensor,
                      residual_TD: torch.Tensor | None, ctx: ForwardContext, handoff: Fp8Input | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(norm(x + residual)), x + residual), or with `post_norm` (post_norm(out + sum), out + sum): o_proj,
        the residual add and that norm in one launch (FusedOutput.project: with the FP8 experts' `handoff`, their
        quantized input too). Only where `fusion.takes` the
        step (engine/models/fused_output.py)."""
        assert self.fusion is not None  # the caller asked fusion.takes
        if residual_TD is None:
            h_TD, residual_TD = norm(x_TD), x_TD
        else:
            h_TD, residual_TD = norm.add_forward(x_TD, residual_TD)
        o_TO = self._heads_out(positions_T, h_TD, ctx)
        if post_norm is None:
            return self.o_proj(o_TO, self.o_bias), residual_TD
        return self.fusion.project(self.kernels, o_TO, self.o_bias, residual_TD, post_norm, handoff)

    def _heads_out(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The attention's output before o_proj, [T, N * Dv] (gated where the layer has an output gate)."""
        a = self.attn
        T, N, C, Dn = x_TD.shape[0], a.num_heads, a.kv_lora_rank, a.qk_nope_head_dim
        q_TX, kv_TR = self.fused_a_proj.split(self.fused_a_proj(x_TD, self.fused_a_bias))
        if a.q_lora_rank is not None:
            q_resid_TQ = self.q_a_layernorm(q_TX)
            q_TX = self.q_b_proj(q_resid_TQ)
            if self.q_out_scale != 1.0:  # MLAConfig.q_scale on a q_b_proj it could not be folded into
                q_TX = q_TX * self.q_out_scale
        q_TNX = q_TX.view(T, N, a.qk_head_dim)
        cache_BLR, *index_cache = ctx.kv_caches[self.layer_idx]
        # An fp8 latent cache (--kv-cache-dtype fp8) with this layer's scale; the plain call otherwise.
        kv_scale = (self.kv_scale,) if cache_BLR.dtype in FP8_CACHE_DTYPES else ()
        # kv_a_layernorm, the rotary of q_pe and k_pe, and the latent write in one op (one launch with the Triton
        # kernels, where the ops one by one were nine at decode: kernels/mla_input.py).
        norm = self.kv_a_layernorm
        # NoPE (MLAConfig.rotary False): every token at position 0, whose rotation is the identity (cos 1, sin 0).
        rope_positions_T = positions_T if a.rotary else torch.zeros_like(positions_T)
        q_pe_TNP = self.kernels.mla_rope_write_latent(
            q_TNX[..., Dn:], kv_TR[:, :C], kv_TR[:, C:], rope_positions_T, self.rope.table_PR, self.rope.style,
            norm.weight, norm.eps, cache_BLR, ctx.attn.slot_mapping_T, *kv_scale)
        w_NXC = self.kv_b_proj.weight.view(N, Dn + a.v_head_dim, C)
        # q_latent[n] = q_nope[n] @ W_UK[n]: [N, T, Dn] @ [N, Dn, C] -> [N, T, C]
        q_latent_NTC = torch.bmm(q_TNX[..., :Dn].transpose(0, 1), w_NXC[:, :Dn])
        if self.indexer is not None:  # this step's selection, for this layer and the shared layers after it
            ctx.dsa_topk = self.indexer(positions_T, x_TD, q_resid_TQ, index_cache[0], ctx.attn)
        sinks = {"sinks_N": self.sinks_N} if self.sinks_N is not None else {}
        if self.sparse and ctx.dsa_topk is not None:
            out_TNC = self.kernels.sparse_mla_attention(q_latent_NTC.transpose(0, 1), q_pe_TNP, cache_BLR, ctx.attn,
                                                        ctx.dsa_topk, a.softmax_scale, *kv_scale, **sinks)
        else:  # dense MLA, or a DSA step whose queries all see at most index_topk positions (the same tokens)
            out_TNC = self.kernels.mla_attention(q_latent_NTC.transpose(0, 1), q_pe_TNP, cache_BLR, ctx.attn,
                                                 a.softmax_scale, *kv_scale, **sinks)
        # o[n] = out_latent[n] @ W_UV[n]^T: [N, T, C] @ [N, C, Dv] -> [N, T, Dv]
        o_NTV = torch.bmm(out_TNC.transpose(0, 1), w_NXC[:, Dn:].transpose(1, 2))
        o_TNV = o_NTV.transpose(0, 1)
        if self.g_proj is not None and a.output_gate_values:  # Hy4's gate per value, in the activations' dtype
            o_TNV = o_TNV * torch.sigmoid(self.g_proj(x_TD).to(o_TNV.dtype)).view(T, N, a.v_head_dim)
        elif self.g_proj is not None:  # the per-head output gate, in float32 then rounded, as transformers
            o_TNV = o_TNV * torch.sigmoid(self.g_proj(x_TD).float()).to(o_TNV.dtype)[:, :, None]
        return o_TNV.reshape(T, N * a.v_head_dim)

    def process_weights_after_loading(self, updated: set[int] | None = None) -> None:
        """Fold MLAConfig's q_scale into q_b_proj and latent_scale into kv_a_layernorm (LongCat-Flash): the same
        products transformers takes after those two ops, paid once here instead of every step. A quantized q_b_proj
        (FP8) keeps its weights: its output is scaled in the forward instead (`q_out_scale`). `updated`: after a
        weight update, the ids of the parameters it wrote: only those are folded (again)."""
        a = self.attn
        if a.q_scale != 1.0:
            if self.q_b_proj.weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                if updated is None or id(self.q_b_proj.weight) in updated:
                    with torch.no_grad():
                        self.q_b_proj.weight.mul_(a.q_scale)
            else:
                self.q_out_scale = a.q_scale
        if a.latent_scale != 1.0 and (updated is None or id(self.kv_a_layernorm.weight) in updated):
            with torch.no_grad():
                self.kv_a_layernorm.weight.mul_(a.latent_scale)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.self_attn.") → (parameter, index[, checkpoint rows])."""
        a = self.attn
        q_order, kv_order = self._row_orders(a, self.tp_size)
        q_rows, kv_rows = (self.fused_a_proj.piece_rows(0),), (self.fused_a_proj.piece_rows(1),)
        if not a.rope_in_checkpoint:
            return self._nope_plan(p)
        plan = {**self.fused_a_proj.weight_plan(p + "kv_a_proj_with_mqa.weight", 1, *kv_order),
                p + "kv_a_layernorm.weight": PlanEntry(self.kv_a_layernorm.weight, ()),
                **self.kv_b_proj.weight_plan(p + "kv_b_proj.weight"),
                **self.o_proj.weight_plan(p + "o_proj.weight")}
        if a.q_lora_rank is not None:
            plan.update(self.fused_a_proj.weight_plan(p + "q_a_proj.weight", 0))
            plan[p + "q_a_layernorm.weight"] = PlanEntry(self.q_a_layernorm.weight, ())
            plan.update(self.q_b_proj.weight_plan(p + "q_b_proj.weight", 0, *q_order))
        else:
            plan.update(self.fused_a_proj.weight_plan(p + "q_proj.weight", 0, *q_order))
        if self.indexer is not None:
            plan.update(self.indexer.weight_plan(p + "indexer."))
        if self.g_proj is not None:
            plan.update(self.g_proj.weight_plan(p + "g_proj.weight"))
        if self.sinks_N is not None:  # this rank's heads' sinks
            heads = (slice(self.head0, self.head0 + a.num_heads),) if self.tp_size > 1 else ()
            plan[p + "sinks"] = PlanEntry(self.sinks_N, (), heads)
        if a.attention_bias:
            plan[p + "kv_a_proj_with_mqa.bias"] = PlanEntry(self.fused_a_bias, kv_rows, *kv_order)
            plan[p + "o_proj.bias"] = PlanEntry(self.o_bias, ())
            if a.q_lora_rank is not None:
                plan[p + "q_a_proj.bias"] = PlanEntry(self.fused_a_bias, q_rows)
        return plan

    def _nope_plan(self, p: str) -> WeightPlan:
        """MLAConfig.rope_in_checkpoint False: kv_a_proj_with_mqa's C rows into c_kv's rows, each head's Dn q_b_proj
        rows into its q_nope rows (this rank's heads under TP); the rope rows stay zero."""
        a = self.attn
        N, Dn, X, C = a.num_heads, a.qk_nope_head_dim, a.qk_head_dim, a.kv_lora_rank
        kv0 = self.fused_a_proj.piece_rows(1).start
        w = self.q_b_proj.weight
        Q = w.shape[1]
        q_nope_NDQ = w.view(N, X, Q)[:, :Dn]  # a view: the copy lands in q_b_proj's nope rows
        q_nope = Rearranged(q_nope_NDQ, lambda t: t.view(N, Dn, Q), source=((N * Dn, Q), w.dtype))
        rows = slice(self.head0 * Dn, (self.head0 + N) * Dn)
        plan = {p + "kv_a_proj_with_mqa.weight": PlanEntry(self.fused_a_proj.weight, (slice(kv0, kv0 + C),)),
                p + "kv_a_layernorm.weight": PlanEntry(self.kv_a_layernorm.weight, ()),
                **self.kv_b_proj.weight_plan(p + "kv_b_proj.weight"),
                **self.o_proj.weight_plan(p + "o_proj.weight"),
                **self.fused_a_proj.weight_plan(p + "q_a_proj.weight", 0),
                p + "q_a_layernorm.weight": PlanEntry(self.q_a_layernorm.weight, ()),
                p + "q_b_proj.weight": PlanEntry(q_nope, (), (rows,))}
        if self.indexer is not None:
            plan.update(self.indexer.weight_plan(p + "indexer."))
        if a.attention_bias or self.g_proj is not None:
            raise ValueError("MLA without a rope part in the checkpoint has no attention_bias or output gate here.")
        return plan

    @staticmethod
    def _row_orders(a: MLAConfig, tp_size: int) -> tuple[tuple, tuple]:
        """Checkpoint row orders of the q projection that makes q_pe and of kv_a_proj_with_mqa (`a`: this rank's
        config): () as stored, or, for DeepSeek-V3's interleaved rope, each rope part de-interleaved
        (rope.deinterleave_rows) so the neox rotary kernel computes transformers' interleaved rotation."""
        if a.rope.style != "interleaved":
            return (), ()
        X, Dn, P, C = a.qk_head_dim, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        head_X = torch.cat([torch.arange(Dn), Dn + deinterleave_rows(P)])
        # Every head's (the global layout); a TP shard's Linear cuts its own heads' rows out of it.
        heads = a.num_heads * tp_size
        q_order = (torch.arange(heads)[:, None] * X + head_X[None, :]).reshape(-1)
        kv_order = torch.cat([torch.arange(C), C + deinterleave_rows(P)])
        return ((q_order,),), ((kv_order,),)
