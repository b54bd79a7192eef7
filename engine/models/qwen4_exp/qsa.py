"""QSA attention (transformers' Qwen4ExpTextAttention with its Qwen4ExpTextQSAIndexer; reader.QSAIndexerConfig has
the definition): Qwen3.5's gated GQA (gqa.py: q/k per-head norms, partial rotary, a sigmoid output gate) whose
queries attend only to the tokens their indexer selects.

Per token the indexer projects the layer input to H index queries and one raw key (index_qk_proj); the raw keys are
cached beside K and V (`ctx.kv_caches[layer] = (k_cache, v_cache, index_cache)`, one head_dim row per token on the
same block ids, so block accounting, prefix caching and PD transfers cover them). Each step pools every complete
block of `compress_ratio` cached keys (mean in float32, then the k norm and the rope at the block's first position,
as transformers does), scores the blocks per query in float32, and selects the best `budget / compress_ratio`
complete blocks plus the query's incomplete last block: at most budget + compress_ratio - 1 positions, -1 padded.

The selection and the sparse attention are plain torch here (the reference; no Triton kernel yet).

Legend: T tokens in the flat batch, S sequences, D hidden, N query heads, K kv heads, H head dim, Hi index heads,
Di index head dim, B pooled blocks, X selected positions, L cache block size.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import causal_lens
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..gqa import GQAAttention
from ..layers import ForwardContext, RMSNorm, param
from .reader import IndexedGQAConfig, QSAIndexerConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


def _slots(meta: AttentionMetadata, seq_X: torch.Tensor, pos_X: torch.Tensor, L: int) -> torch.Tensor:
    """Flat cache slots of positions pos_X (>= 0) of sequences seq_X."""
    tables = meta.block_tables_SM.long()
    block = (pos_X // L).clamp(max=tables.shape[1] - 1)
    return tables[seq_X, block] * L + pos_X % L


def _token_seqs(meta: AttentionMetadata, device) -> torch.Tensor:
    qlen_S = torch.tensor(meta.query_lens, device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlen_S)


def qsa_select(q_THD: torch.Tensor, index_cache_BLD: torch.Tensor, meta: AttentionMetadata, cfg: QSAIndexerConfig,
               pool_keys, device) -> torch.Tensor:
    """int64 [T, X] selected positions per query token (-1 padded). `pool_keys(raw [S, B, c, Di]) -> [S, B, Di]`:
    the pooled blocks' keys (normed, roped)."""
    T, c = q_THD.shape[0], cfg.compress_ratio
    n_T = causal_lens(meta, device)
    nc_T = n_T // c  # complete blocks each query sees
    seq_T = _token_seqs(meta, device)
    B = meta.max_seq_len // c
    k = cfg.block_topk
    picks = []
    if B > 0:
        S, L, Di = meta.num_seqs, index_cache_BLD.shape[1], index_cache_BLD.shape[2]
        pos = torch.arange(B * c, device=device)
        seq_SX = torch.arange(S, device=device)[:, None].expand(S, B * c)
        slots = _slots(meta, seq_SX.reshape(-1), pos.repeat(S), L)
        raw_SBcD = index_cache_BLD.view(-1, Di).index_select(0, slots).view(S, B, c, Di)
        keys_SBD = pool_keys(raw_SBcD)
        dots_THB = torch.einsum("thd,tbd->thb", q_THD.float(), keys_SBD.float().index_select(0, seq_T))
        score_TB = torch.relu(dots_THB).sum(dim=1) / math.sqrt(Di)
        visible_TB = torch.arange(B, device=device)[None, :] < nc_T[:, None]
        score_TB = score_TB.masked_fill(~visible_TB, float("-inf"))
        kk = min(k, B)
        top_Tk = score_TB.topk(kk, dim=1).indices
        top_Tk = torch.where(top_Tk < nc_T[:, None], top_Tk, -1)
        tok = top_Tk[:, :, None] * c + torch.arange(c, device=device)
        picks.append(torch.where(top_Tk[:, :, None] >= 0, tok, -1).view(T, kk * c))
    tail = nc_T[:, None] * c + torch.arange(c - 1, device=device)[None, :]
    picks.append(torch.where(tail < n_T[:, None], tail, -1))
    return torch.cat(picks, dim=1)


def sparse_gqa_attention(q_TNH: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         pos_TX: torch.Tensor, scale: float) -> torch.Tensor:
    """Token t's heads attend to the cached K/V of its positions pos_TX[t] (>= 0) only: [T, N, H] in q's dtype;
    scores and softmax in float32 (float64 for float64 inputs)."""
    T, N, H = q_TNH.shape
    L, K = k_cache.shape[1], k_cache.shape[2]
    acc = torch.promote_types(q_TNH.dtype, torch.float32)
    valid_TX = pos_TX >= 0
    seq_TX = _token_seqs(meta, q_TNH.device)[:, None].expand_as(pos_TX)
    slots = _slots(meta, seq_TX.reshape(-1), pos_TX.clamp(min=0).reshape(-1), L)
    k_TXKH = k_cache.view(-1, K, k_cache.shape[3]).index_select(0, slots).view(T, -1, K, k_cache.shape[3]).to(acc)
    v_TXKH = v_cache.view(-1, K, v_cache.shape[3]).index_select(0, slots).view(T, -1, K, v_cache.shape[3]).to(acc)
    q_TKGH = q_TNH.to(acc).view(T, K, N // K, H)
    s_TKGX = torch.einsum("tkgh,txkh->tkgx", q_TKGH, k_TXKH) * scale
    p = torch.softmax(s_TKGX.masked_fill(~valid_TX[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("tkgx,txkh->tkgh", p, v_TXKH).reshape(T, N, -1).to(q_TNH.dtype)


class QSAAttention(GQAAttention):
    """Gated GQA (GQAAttention's projections, norms, rotary and KV write) over the positions its indexer selects."""

    def __init__(self, layer_idx: int, hidden_size: int, attn: IndexedGQAConfig, rms_norm_eps: float, rope,
                 kernels: Kernels, dtype, device=None, quant=None, tp=None):
        super().__init__(layer_idx, hidden_size, attn, rms_norm_eps, rope, kernels, dtype, device, quant, tp=tp)
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
        k_cache, v_cache, index_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn
        self.kernels.write_kv(k_TKH.contiguous(), v_TKH.contiguous(), k_cache, v_cache, meta.slot_mapping_T)
        # The indexer: H queries and the token's raw key, cached as it is (pooled per block when read).
        qk_TX = F.linear(x_TD, self.index_qk_XD)
        iq_THD = self.index_q_norm(qk_TX[:, :ix.num_heads * ix.head_dim].reshape(T, ix.num_heads, ix.head_dim))
        iq_THD = self.rope(iq_THD, iq_THD[:, :1], positions_T)[0]
        raw_TD = qk_TX[:, ix.num_heads * ix.head_dim:]
        slots_T = meta.slot_mapping_T.long()  # a padded token's (-1) goes to the null block, the last
        slots_T = torch.where(slots_T >= 0, slots_T, (index_cache.shape[0] - 1) * index_cache.shape[1])
        index_cache.view(-1, ix.head_dim).index_copy_(0, slots_T, raw_TD.to(index_cache.dtype))
        pos_TX = qsa_select(iq_THD, index_cache, meta, ix, self._pool_keys, x_TD.device)
        o_TNH = sparse_gqa_attention(q_TNH, k_cache, v_cache, meta, pos_TX, self.scale)
        o_TO = o_TNH.reshape(T, self.o_size) * torch.sigmoid(gate_TQ)
        return self.o_proj(o_TO, self.o_bias)

    def _pool_keys(self, raw_SBcD: torch.Tensor) -> torch.Tensor:
        """Each block's key: the mean of its raw keys (float32, as transformers), the k norm, the rope at the
        block's first position."""
        S, B, c, Di = raw_SBcD.shape
        pooled = raw_SBcD.float().mean(dim=2).to(raw_SBcD.dtype)
        normed = self.index_k_norm(pooled.reshape(S * B, Di))
        starts = (torch.arange(B, device=raw_SBcD.device) * c).repeat(S)
        roped = self.rope(normed[:, None, :], normed[:, None, :], starts)[0]
        return roped.view(S, B, Di)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = super().weight_plan(p)
        i = p + "indexer."
        plan[i + "index_qk_proj.weight"] = PlanEntry(self.index_qk_XD, ())
        plan.update(self.index_q_norm.weight_plan(i + "q_layernorm.weight"))
        plan.update(self.index_k_norm.weight_plan(i + "k_layernorm.weight"))
        return plan


__all__ = ["QSAAttention", "qsa_select", "sparse_gqa_attention"]
