"""QSA attention (transformers' Qwen4ExpTextAttention with its Qwen4ExpTextQSAIndexer; reader.QSAIndexerConfig has
the definition): Qwen3.5's gated GQA (gqa.py: q/k per-head norms, partial rotary, a sigmoid output gate) whose
queries attend only to the tokens their indexer selects.

Per token the indexer projects the layer input to H index queries and one raw key (index_qk_proj); the raw keys are
cached beside K and V, and so is each complete block's key (`ctx.kv_caches[layer] = (k_cache, v_cache, index_cache,
block_keys)`, one head_dim row per token each on the same block ids, so block accounting, prefix caching and PD
transfers cover them): the token that completes a block of `compress_ratio` pools the block's raw keys (mean in
float32, then the k norm and the rope at the block's first position, as transformers does) into its own row of
block_keys. Each step reads every complete block's key (B rows per sequence, not B * c raw ones), scores the blocks
per query in float32, and selects the best `budget / compress_ratio` complete blocks plus the query's incomplete
last block: at most budget + compress_ratio - 1 positions, -1 padded.

The selection and the attention are kernel ops (kernels/qsa.py: references; kernels/triton_qsa.py: the attention's
Triton kernel); the block keys are pooled here, plain torch.

Legend: T tokens in the flat batch, S sequences, D hidden, N query heads, K kv heads, H head dim, Hi index heads,
Di index head dim, B pooled blocks, X selected positions, L cache block size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moelink.kernels.qsa import cache_slots, token_seqs
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..gqa import GQAAttention
from ..layers import ForwardContext, RMSNorm, param
from .reader import IndexedGQAConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class QSAAttention(GQAAttention):
    """Gated GQA (GQAAttention's projections, norms, rotary and KV write) over the positions its indexer selects."""

    def __init__(self, layer_idx: int, hidden_size: int, attn: IndexedGQAConfig, rms_norm_eps: float, rope,
                 kernels: Kernels, dtype, device=None, quant=None, tp=None, max_model_len: int = 1):
        super().__init__(layer_idx, hidden_size, attn, rms_norm_eps, rope, kernels, dtype, device, quant, tp=tp)
        self.max_model_len = max_model_len
        assert attn.indexer is not None
        self.index_cfg = ix = attn.indexer
        self.index_qk_XD = param((ix.num_heads + 1) * ix.head_dim, hidden_size, dtype=dtype, device=device)
        self.index_q_norm = RMSNorm(ix.head_dim, rms_norm_eps, kernels, dtype, device)
        self.index_k_norm = RMSNorm(ix.head_dim, rms_norm_eps, kernels, dtype, device)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, ix = x_TD.shape[0], self.index_cfg
        q_TQ, k_TK, v_TK = self.qkv_proj.split(self.qkv_proj(x_TD, self.qkv_bias))
        q_TQ, gate_TQ = q_TQ[:, :self.q_size], q_TQ[:, self.q_size:]
        q_TNH = self.q_norm(q_TQ.reshape(T, self.num_heads, self.head_dim))  # type: ignore[misc]
        k_TKH = self.k_norm(k_TK.reshape(T, self.num_kv_heads, self.head_dim))  # type: ignore[misc]
        v_TKH = v_TK.reshape(T, self.num_kv_heads, self.v_head_dim)
        q_TNH, k_TKH = self.rope(q_TNH, k_TKH, positions_T)
        k_cache, v_cache, index_cache, block_keys = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn
        self.kernels.write_kv(k_TKH.contiguous(), v_TKH.contiguous(), k_cache, v_cache, meta.slot_mapping_T)
        # The indexer: H queries and the token's raw key, cached as it is (pooled per block when read).
        qk_TX = F.linear(x_TD, self.index_qk_XD)
        iq_THD = self.index_q_norm(qk_TX[:, :ix.num_heads * ix.head_dim].reshape(T, ix.num_heads, ix.head_dim))
        iq_THD = self.rope(iq_THD, iq_THD[:, :1], positions_T)[0]
        raw_TD = qk_TX[:, ix.num_heads * ix.head_dim:]
        # A padded token's (slot -1) row: zeros into the null block, the last, which stays zero (AttentionMetadata).
        slots_T = meta.slot_mapping_T.long()
        real_T = slots_T >= 0
        slots_T = torch.where(real_T, slots_T, (index_cache.shape[0] - 1) * index_cache.shape[1])
        raw_TD = torch.where(real_T[:, None], raw_TD, torch.zeros_like(raw_TD))
        index_cache.view(-1, ix.head_dim).index_copy_(0, slots_T, raw_TD.to(index_cache.dtype))
        self._write_block_keys(positions_T, real_T, slots_T, index_cache, block_keys, meta)
        keys_SBD = self._block_keys(block_keys, meta)
        pos_TX = self.kernels.qsa_select(iq_THD, keys_SBD, meta, ix.block_topk, ix.compress_ratio)
        o_TNH = self.kernels.sparse_gqa_attention(q_TNH.contiguous(), k_cache, v_cache, meta, pos_TX, self.scale)
        o_TO = o_TNH.reshape(T, self.o_size) * torch.sigmoid(gate_TQ)
        return self.o_proj(o_TO, self.o_bias)

    def _write_block_keys(self, positions_T: torch.Tensor, real_T: torch.Tensor, slots_T: torch.Tensor,
                          index_cache_BLD: torch.Tensor, block_keys_BLD: torch.Tensor, meta) -> None:
        """Each token that completes a block (position p, (p + 1) % c == 0) writes the block's key at its own row:
        the mean of the block's c raw keys (float32, as transformers), the k norm, the rope at the block's first
        position; every other row writes zeros into the null block (which stays zero)."""
        c, Di = self.index_cfg.compress_ratio, self.index_cfg.head_dim
        L, dev = index_cache_BLD.shape[1], positions_T.device
        pos_T = positions_T.long()
        first_T = (pos_T - (c - 1)).clamp(min=0)
        seq_T = token_seqs(meta, dev)
        src = cache_slots(meta, seq_T[:, None].expand(-1, c).reshape(-1), (first_T[:, None] + torch.arange(
            c, device=dev)).reshape(-1), L)
        raw_TcD = index_cache_BLD.view(-1, Di).index_select(0, src).view(-1, c, Di)
        pooled_TD = raw_TcD.float().mean(dim=1).to(raw_TcD.dtype)
        key_TD = self.rope(self.index_k_norm(pooled_TD)[:, None, :], pooled_TD[:, None, :], first_T)[0][:, 0]
        completes_T = real_T & ((pos_T + 1) % c == 0)
        null = (block_keys_BLD.shape[0] - 1) * L
        block_keys_BLD.view(-1, Di).index_copy_(0, torch.where(completes_T, slots_T, null),
                                                torch.where(completes_T[:, None], key_TD, torch.zeros_like(key_TD)))

    def _block_keys(self, block_keys_BLD: torch.Tensor, meta) -> torch.Tensor:
        """[S, B, Di]: each sequence's first B blocks' keys, read from the rows of their last tokens (blocks past a
        sequence's complete ones read any rows: the selection never picks them). B = max_seq_len // c, or for a
        pure decode step max_model_len // c: a decode step's host lengths may be placeholders (a decode graph's), so
        its width comes from the model alone, as DSA's decode steps do."""
        c, Di, S = self.index_cfg.compress_ratio, self.index_cfg.head_dim, meta.num_seqs
        width = self.max_model_len if meta.max_query_len == 1 else meta.max_seq_len
        B, L = width // c, block_keys_BLD.shape[1]
        dev = block_keys_BLD.device
        seq_X = torch.arange(S, device=dev)[:, None].expand(S, B).reshape(-1)
        last_X = (torch.arange(B, device=dev) * c + c - 1).repeat(S)
        return block_keys_BLD.view(-1, Di).index_select(0, cache_slots(meta, seq_X, last_X, L)).view(S, B, Di)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = super().weight_plan(p)
        i = p + "indexer."
        plan[i + "index_qk_proj.weight"] = PlanEntry(self.index_qk_XD, ())
        plan.update(self.index_q_norm.weight_plan(i + "q_layernorm.weight"))
        plan.update(self.index_k_norm.weight_plan(i + "k_layernorm.weight"))
        return plan


__all__ = ["QSAAttention"]
