"""The batch-invariant backend's QSA (Qwen3.8-Flash-Next's indexed attention; kernels/qsa.py holds the references
whose contracts these keep).

The selection is DeepSeek Sparse Attention's indexer over the pooled blocks (kernels/qsa.qsa_select), run here on the
backend's invariant DSA top-k (each row's scores alone, on fixed blocks of keys). The attention walks each token's
selected positions in their order, BLOCK at a time, with an online softmax (kernels/batch_invariant_kernels.
walk_blocks): a row has the same fixed number of columns whatever the batch (the budget plus the tail), -1 columns are
exact no-ops, and a decode step's token and the same position in a prefill select and walk the same positions.

Legend: T tokens, N query heads, K kv heads, H head dim, X selected positions, B BLOCK.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata
from .batch_invariant_kernels import invariant_dsa_topk, walk_blocks
from .qsa import cache_slots, qsa_select, token_seqs

BLOCK = 16


def invariant_qsa_select(q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
                         compress_ratio: int) -> torch.Tensor:
    """`reference_qsa_select`'s positions with the invariant DSA top-k: int64 [T, block_topk * c + c - 1]."""
    return qsa_select(invariant_dsa_topk, q_THD, keys_SBD, meta, block_topk, compress_ratio)


def invariant_sparse_gqa_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                   meta: AttentionMetadata, pos_TX: torch.Tensor, scale: float) -> torch.Tensor:
    """`reference_sparse_gqa_attention`'s contract (GQA over each token's positions pos_TX[t], -1 padding) as the
    walk over the row's columns in order: [T, N, Hv] in q's dtype."""
    with torch._C.DisableTorchFunction():
        T = q_TNH.shape[0]
        L = k_cache_BLKH.shape[1]
        X = pos_TX.shape[1]
        pos = F.pad(pos_TX.long(), (0, -X % BLOCK), value=-1)
        seq_T = token_seqs(meta, q_TNH.device)

        def blocks():
            for j in range(0, pos.shape[1], BLOCK):
                p_TB = pos[:, j:j + BLOCK]
                valid_TB = p_TB >= 0
                slots = cache_slots(meta, seq_T[:, None].expand_as(p_TB).reshape(-1), p_TB.clamp(min=0).reshape(-1), L)
                yield torch.where(valid_TB, slots.view(T, -1), meta.null_block * L), valid_TB
        acc = torch.promote_types(q_TNH.dtype, torch.float32)
        return walk_blocks(q_TNH, k_cache_BLKH, v_cache_BLKH, blocks(), scale, None, 1.0, 1.0, acc)


__all__ = ["BLOCK", "invariant_qsa_select", "invariant_sparse_gqa_attention"]
