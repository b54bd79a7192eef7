"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): which cached positions each query of an MLA
layer attends to (engine/models/dsa_config.py has the definition; kernels/dsa.py the selection's contract).

Legend: T tokens in the flat batch, D hidden, Q q_lora_rank, H index heads, Di index head dim, K index_topk.

Per token: q = wq_b(q_resid) [H, Di] from MLA's normalised q latent; k = LayerNorm(wk(x)) [Di], one key shared by the
heads and cached beside the latent (`ctx.kv_caches[layer] = (latent_cache, index_cache)`: float keys, or fp8 keys with
a float32 scale per 128 values, as the layer's IndexerConfig.key_dtype lays the cache out); both roped on their first
qk_rope_head_dim dims with the layer's rope table (GLM-5's interleaved pairs de-interleaved at load: the rows of wq_b's
and wk's rope parts, and k_norm's weight and bias with them, since a LayerNorm commutes with a permutation of its
features; Hunyuan Hy4's rope on the last dims moved first the same way, IndexerConfig.rope_position); weights = weights_proj(x) / sqrt(H) in float32 (transformers keeps weights_proj in float32 for half models).

Under tensor parallelism (mla.py splits the MLA heads) the indexer is whole on every rank, weights and key cache: its
inputs (x and the q latent, before the heads split) are the same on every rank of the group, so every rank selects
the same top-k with no collective, and each then attends over those rows with its own heads. Splitting its heads
would need an all-reduce of the [T, positions] scores before the top-k, for weights that are small beside MLA's.

GLM-5.3-Flash's pooled indexer (IndexerConfig.kpool > 1, no rope): each token's cache row is [key | gate], gate =
index_kpool_compress_gate @ x; the selection scores pools of kpool tokens (kernels.dsa_pool_topk) and returns their
tokens plus the query's own incomplete pool's (topk + kpool - 1 positions at most).

Dense or sparse: a step whose every query sees at most K positions selects them all, so the indexer writes its keys
and returns None (the layer runs dense MLA: the same tokens). Decode steps decide from max_model_len alone: their host
lengths are placeholders inside a decode graph, which must capture the sparse path (device lengths, no host sync).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import is_fp8_index_cache
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .dsa_config import IndexerConfig
from .layers import param
from .linear import Linear, linear_method
from .rope import RotaryEmbedding, deinterleave_rows

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class LightningIndexer(nn.Module):
    def __init__(self, layer_idx: int, hidden_size: int, q_lora_rank: int, cfg: IndexerConfig, rope: RotaryEmbedding,
                 kernels: Kernels, dtype, device=None, quant=None, max_model_len: int = 1):
        super().__init__()
        self.cfg, self.rope, self.kernels, self.max_model_len = cfg, rope, kernels, max_model_len
        H, Di = cfg.num_heads, cfg.head_dim
        f = dict(dtype=dtype, device=device)
        p = f"model.layers.{layer_idx}.self_attn.indexer."
        self.wq_b = Linear(q_lora_rank, H * Di, linear_method(quant, p + "wq_b"), kernels, **f)
        self.wk = Linear(hidden_size, Di, linear_method(quant, p + "wk"), kernels, **f)
        self.k_norm_weight, self.k_norm_bias = param(Di, **f), param(Di, **f)
        # float32 for half models, as transformers keeps it (_keep_in_fp32_modules); float64 runs stay float64.
        w_dt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        self.weights_proj = param(H, hidden_size, dtype=w_dt, device=device)
        if cfg.pooled:  # GLM-5.3-Flash's pooled selection (engine/models/dsa_config.py): the pools' weights
            self.ape_PI = param(cfg.kpool, Di, **f)
            self.compress_gate_ID = param(Di, hidden_size, **f)

    def dense(self, meta: AttentionMetadata) -> bool:
        """Whether every query of the step sees at most index_topk positions (module docstring)."""
        K = self.cfg.topk
        return self.max_model_len <= K or (meta.max_query_len > 1 and meta.max_seq_len <= K)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, q_resid_TQ: torch.Tensor,
                index_cache_BLI: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Writes this step's keys at meta.slot_mapping_T; returns the selected positions, int32 [T, K] (-1 past a
        query's count), or None when the step is dense."""
        c = self.cfg
        T = x_TD.shape[0]
        k_TI = F.layer_norm(self.wk(x_TD), (c.head_dim,), self.k_norm_weight, self.k_norm_bias,
                            c.k_norm_eps)
        dense = self.dense(meta)
        if c.pooled:
            return self._pooled(x_TD, q_resid_TQ, k_TI, index_cache_BLI, meta, dense)
        if dense:  # keys only: rotate k alone (as its own query)
            k_T1I = self.rope(k_TI[:, None, :], k_TI[:, None, :], positions_T)[1]
        else:
            q_THI = self.wq_b(q_resid_TQ).view(T, c.num_heads, c.head_dim)
            q_THI, k_T1I = self.rope(q_THI, k_TI[:, None, :], positions_T)
        k_TI = k_T1I[:, 0]
        if is_fp8_index_cache(index_cache_BLI):  # e4m3 keys and their per-128 scales (kernels/dsa.py's layout)
            self.kernels.write_fp8_index_keys(k_TI, index_cache_BLI, meta.slot_mapping_T)
        else:  # one row per token, as a latent row is written (any split of the row: the op writes [first | second])
            half = c.head_dim // 2
            self.kernels.write_latent(k_TI[:, :half], k_TI[:, half:], index_cache_BLI, meta.slot_mapping_T)
        if dense:
            return None
        w = self.weights_proj
        weights_TH = F.linear(x_TD.to(w.dtype), w).float() * c.num_heads**-0.5
        return self.kernels.dsa_topk(q_THI, weights_TH, index_cache_BLI, meta, c.topk, c.softmax_scale,
                                     self.max_model_len)

    def _pooled(self, x_TD: torch.Tensor, q_resid_TQ: torch.Tensor, k_TI: torch.Tensor,
                index_cache_BLX: torch.Tensor, meta: AttentionMetadata, dense: bool) -> torch.Tensor | None:
        """GLM-5.3-Flash's pooled selection: no rope; the cache row [key | gate] (gate = compress_gate @ x); the
        selected pools' tokens and the query's incomplete pool's (kernels.dsa_pool_topk), or None when dense."""
        c = self.cfg
        gate_TI = F.linear(x_TD, self.compress_gate_ID)
        self.kernels.write_latent(k_TI, gate_TI, index_cache_BLX, meta.slot_mapping_T)
        if dense:
            return None
        q_THI = self.wq_b(q_resid_TQ).view(x_TD.shape[0], c.num_heads, c.head_dim)
        w = self.weights_proj
        weights_TH = F.linear(x_TD.to(w.dtype), w).float() * c.num_heads**-0.5
        return self.kernels.dsa_pool_topk(q_THI, weights_TH, index_cache_BLX, self.ape_PI, meta, c.topk,
                                          c.softmax_scale, self.max_model_len)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.self_attn.indexer.") → parameters; GLM-5's interleaved rope
        rows de-interleaved (module docstring)."""
        q_order, k_order = self._row_orders()
        pooled = ({p + "index_kpool_compress_ape": PlanEntry(self.ape_PI, ()),
                   p + "index_kpool_compress_gate": PlanEntry(self.compress_gate_ID, ())} if self.cfg.pooled else {})
        return {**pooled,**self.wq_b.weight_plan(p + "wq_b.weight", 0, *q_order),
                **self.wk.weight_plan(p + "wk.weight", 0, *k_order),
                p + "k_norm.weight": PlanEntry(self.k_norm_weight, (), *k_order),
                p + "k_norm.bias": PlanEntry(self.k_norm_bias, (), *k_order),
                p + "weights_proj.weight": PlanEntry(self.weights_proj, ())}

    def _row_orders(self) -> tuple[tuple, tuple]:
        """Each head's checkpoint rows in the order the kernels rotate: the rope part first (Hy4's last rope_dim rows
        moved to the front), de-interleaved where GLM-5 pairs them; () when stored so."""
        c = self.cfg
        if c.rope_style != "interleaved" and c.rope_position == "first":
            return (), ()
        R, Di = c.rope_dim, c.head_dim
        rope = deinterleave_rows(R) if c.rope_style == "interleaved" else torch.arange(R)
        if c.rope_position == "last":
            head = torch.cat([Di - R + rope, torch.arange(Di - R)])
        else:
            head = torch.cat([rope, torch.arange(R, Di)])
        q_order = (torch.arange(c.num_heads)[:, None] * c.head_dim + head[None, :]).reshape(-1)
        return ((q_order,),), ((head,),)
