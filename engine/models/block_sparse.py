"""Block-sparse attention (MiniMax-M3's sparse layers): GQA whose queries attend only to the key blocks a block
indexer keeps (engine/models/block_sparse_config.py has the definition; kernels/block_sparse.py the ops).

Legend: T tokens in the flat batch, D hidden, N query heads (this rank's), H index heads, I index head dim, S
topk_blocks.

Per token: index queries q = rope(norm(index_q_proj(x))) [H, I], one index key k = rope(norm(index_k_proj(x))) [I]
shared by the heads and cached beside the layer's K and V (`ctx.kv_caches[layer] = (k_cache, v_cache, index_cache)`),
both rotated on their first rotary_dim dims with the layer's rope table; the norms are RMSNorms with the model's norm
offset (MiniMax-M3's zero-centred weights, ModelConfig.norm_weight_offset). The layer's q/k/v, norms, rotary and
KV write are GQA's (gqa.GQAAttention); only the attention differs.

Under tensor parallelism the indexer is whole on every rank, weights and key cache: its input (x) is the same on
every rank, so every rank selects the same blocks with no collective and keeps the selections of its own query
heads (a selection is per index head, a group of N / H query heads).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.kernels.attention import AttentionMetadata
from moelink.moe.weight_plan import WeightPlan

from .block_sparse_config import BlockIndexerConfig, BlockSparseConfig
from ..tp.group import TensorParallel
from .gqa import GQAAttention
from .layers import ForwardContext, RMSNorm
from .linear import Linear, linear_method
from .rope import RotaryEmbedding

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class BlockIndexer(nn.Module):
    """The layer's block indexer: writes this step's index keys, returns the kept blocks int32 [T, H, S]."""

    def __init__(self, layer_idx: int, hidden_size: int, cfg: BlockIndexerConfig, rms_norm_eps: float,
                 rope: RotaryEmbedding, kernels: Kernels, dtype, device=None, quant=None, max_model_len: int = 1):
        super().__init__()
        self.cfg, self.rope, self.kernels, self.max_model_len = cfg, rope, kernels, max_model_len
        p = f"model.layers.{layer_idx}.self_attn."
        f = dict(dtype=dtype, device=device)
        self.q_proj = Linear(hidden_size, cfg.num_heads * cfg.head_dim, linear_method(quant, p + "index_q_proj"),
                             kernels, **f)
        self.k_proj = Linear(hidden_size, cfg.head_dim, linear_method(quant, p + "index_k_proj"), kernels, **f)
        self.q_norm = RMSNorm(cfg.head_dim, rms_norm_eps, kernels, **f)
        self.k_norm = RMSNorm(cfg.head_dim, rms_norm_eps, kernels, **f)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, index_cache_BLI: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        c = self.cfg
        T = x_TD.shape[0]
        q_THI = self.q_norm(self.q_proj(x_TD).view(T, c.num_heads, c.head_dim))
        k_T1I = self.k_norm(self.k_proj(x_TD).view(T, 1, c.head_dim))
        q_THI, k_T1I = self.rope(q_THI, k_T1I, positions_T)
        k_TI = k_T1I[:, 0].to(index_cache_BLI.dtype)
        half = c.head_dim // 2  # one row per token, as a latent row is written (any split of the row)
        self.kernels.write_latent(k_TI[:, :half], k_TI[:, half:], index_cache_BLI, meta.slot_mapping_T)
        return self.kernels.block_sparse_select(q_THI.contiguous(), index_cache_BLI, meta, c.block_size,
                                                c.topk_blocks, c.local_blocks, self.max_model_len)

    def weight_plan(self, p: str) -> WeightPlan:
        """Checkpoint names under `p` ("model.layers.{i}.self_attn."), as MiniMax-M3 publishes them."""
        return {**self.q_proj.weight_plan(p + "index_q_proj.weight"), **self.k_proj.weight_plan(p + "index_k_proj.weight"),
                **self.q_norm.weight_plan(p + "index_q_norm.weight"),
                **self.k_norm.weight_plan(p + "index_k_norm.weight")}


class BlockSparseAttention(GQAAttention):
    """GQAAttention whose attention, on a layer with an indexer, reads only the blocks the indexer keeps; a layer
    without one (BlockSparseConfig.indexer None) is GQA exactly."""

    def __init__(self, layer_idx: int, hidden_size: int, attn: BlockSparseConfig, rms_norm_eps: float,
                 rope: RotaryEmbedding, kernels: Kernels, dtype, device=None, quant=None, max_model_len: int = 1, *,
                 tp: TensorParallel | None = None):
        super().__init__(layer_idx, hidden_size, attn, rms_norm_eps, rope, kernels, dtype, device, quant, tp=tp)
        ix = attn.indexer
        self.indexer = (BlockIndexer(layer_idx, hidden_size, ix, rms_norm_eps, rope, kernels, dtype, device, quant,
                                     max_model_len) if ix is not None else None)
        # Query heads per index head, over the whole model's heads (attn is the unsharded config).
        self.heads_per_index = attn.num_heads // ix.num_heads if ix is not None else 1
        # Runs of this rank's consecutive heads that share one selection (this rank's heads start at a multiple of
        # its head count): the attention kernel's unit of work (it also keeps a run within one kv head).
        self.selection_run = math.gcd(self.heads_per_index, self.num_heads)

    def _attend(self, q_TNH: torch.Tensor, x_TD: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext,
                attn, kv_scales: dict) -> torch.Tensor:
        if self.indexer is None:
            return super()._attend(q_TNH, x_TD, positions_T, ctx, attn, kv_scales)
        k_cache, v_cache, index_cache = ctx.kv_caches[self.layer_idx]
        blocks_THS = self.indexer(positions_T, x_TD, index_cache, attn)
        # Each query head reads its index head's selection; this rank's heads only.
        blocks_TNS = blocks_THS.repeat_interleave(self.heads_per_index, dim=1)
        blocks_TNS = blocks_TNS[:, self.q_head0:self.q_head0 + self.num_heads].contiguous()
        return self.kernels.block_sparse_attention(q_TNH, k_cache, v_cache, attn, blocks_TNS,
                                                   self.indexer.cfg.block_size, self.scale, **kv_scales,
                                                   group=self.selection_run)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = super().weight_plan(p)
        if self.indexer is not None:
            plan.update(self.indexer.weight_plan(p))
        return plan


__all__ = ["BlockIndexer", "BlockSparseAttention"]
