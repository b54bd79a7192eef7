"""The batch-invariant backend's kernels for block-sparse attention (MiniMax-M3's sparse layers;
kernels/block_sparse.py holds the references whose contracts these keep).

What moves with the batch, or with how a sequence was cut into steps, in the references: the selection's scores are
one einsum over a sequence's host length, and the attention's softmax runs over that length, which for the same query
position is the chunk's end in a prefill and the position itself in a decode step. Here a query's index scores are
computed on blocks of the paged cache's block size (a fixed product per block, kernels/batch_invariant.fixed_bmm) and
reduced to per-selection-block maxima (a max is exact in any order); the attention walks the paged cache's blocks in
position order with an online softmax (kernels/batch_invariant_kernels.walk_blocks), each head seeing only the
positions of the blocks it selected, so a position past the row's own or outside its selection is an exact no-op.

Legend: T tokens, N query heads, H head dim, I index head dim, L the paged cache's block size, W positions,
S topk_blocks, Bs the selection's block size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata
from .batch_invariant import fixed_bmm
from .batch_invariant_kernels import row_positions, walk_blocks


def _cache_blocks(meta: AttentionMetadata, L: int, width_M: int) -> int:
    """Paged-cache blocks every row walks: enough for the step's longest sequence (the rest are no-ops)."""
    return min(-(-max(meta.seq_lens) // L), width_M)


def invariant_block_sparse_select(q_THI: torch.Tensor, index_cache_BLI: torch.Tensor, meta: AttentionMetadata,
                                  block_size: int, topk_blocks: int, local_blocks: int,
                                  max_len: int | None = None) -> torch.Tensor:
    """`reference_block_sparse_select`'s choice (the local blocks forced in, then the best of the rest by the max over
    the block of q . k in float32, ties as torch.topk breaks them), each row's scores computed alone: int32
    [T, H, topk_blocks], -1 padded."""
    with torch._C.DisableTorchFunction():
        T, H, I = q_THI.shape
        L = index_cache_BLI.shape[1]
        dev = q_THI.device
        seq_T, ctx_T, pos_T = row_positions(meta, T, dev)
        tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
        M = _cache_blocks(meta, L, tables_TM.shape[1])
        keys = index_cache_BLI.reshape(-1, I)
        q_THI32 = q_THI.float().contiguous()
        offs_L = torch.arange(L, device=dev)
        parts = []
        for j in range(M):
            kpos_TL = j * L + offs_L[None, :]
            slots_TL = torch.where(kpos_TL < ctx_T[:, None], tables_TM[:, j:j + 1] * L + offs_L[None, :],
                                   meta.null_block * L)
            k_TIL = keys.index_select(0, slots_TL.reshape(-1)).float().view(T, L, I).transpose(1, 2).contiguous()
            s_THL = fixed_bmm(q_THI32, k_TIL)
            parts.append(s_THL.masked_fill(~(kpos_TL <= pos_T[:, None])[:, None, :], float("-inf")))
        W = M * L
        nb = -(-W // block_size)
        s_THW = F.pad(torch.cat(parts, dim=-1), (0, nb * block_size - W), value=float("-inf"))
        b_THB = s_THW.view(T, H, nb, block_size).amax(-1)
        own_T = pos_T // block_size
        for back in range(local_blocks):  # forced in, as transformers does: +inf
            idx_T = (own_T - back).clamp(min=0)
            b_THB.scatter_(-1, idx_T[:, None, None].expand(T, H, 1), float("inf"))
        out_THS = torch.full((T, H, topk_blocks), -1, dtype=torch.int32, device=dev)
        k = min(topk_blocks, nb)
        vals, ids = b_THB.topk(k, dim=-1)
        out_THS[:, :, :k] = ids.masked_fill(vals == float("-inf"), -1).to(torch.int32)
        return out_THS


def invariant_block_sparse_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                     meta: AttentionMetadata, blocks_TNS: torch.Tensor, block_size: int,
                                     scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                                     group: int = 1) -> torch.Tensor:
    """`reference_block_sparse_attention`'s contract as the walk over the paged cache's blocks in position order,
    head n of token t seeing the positions (at or before its own) of the blocks blocks_TNS[t, n] holds: [T, N, Hv].
    `group` changes nothing here (every head reads its own selection)."""
    T, N, _ = q_TNH.shape
    if blocks_TNS.dim() != 3 or tuple(blocks_TNS.shape[:2]) != (T, N):
        raise ValueError(f"blocks_TNS {tuple(blocks_TNS.shape)} is invalid: must be [{T}, {N}, topk_blocks].")
    with torch._C.DisableTorchFunction():
        L = k_cache_BLKH.shape[1]
        dev = q_TNH.device
        seq_T, ctx_T, pos_T = row_positions(meta, T, dev)
        tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
        M = _cache_blocks(meta, L, tables_TM.shape[1])
        sel_TNS = blocks_TNS.long()
        offs_L = torch.arange(L, device=dev)

        def blocks():
            for j in range(M):
                kpos_TL = j * L + offs_L[None, :]
                slots_TL = torch.where(kpos_TL < ctx_T[:, None], tables_TM[:, j:j + 1] * L + offs_L[None, :],
                                       meta.null_block * L)
                # Selected: the position's selection block is among the head's picks (-1 never matches).
                picked_TNL = (sel_TNS[:, :, :, None] == (kpos_TL // block_size)[:, None, None, :]).any(dim=2)
                yield slots_TL, picked_TNL & (kpos_TL <= pos_T[:, None])[:, None, :]
        acc = torch.promote_types(q_TNH.dtype, torch.float32)
        return walk_blocks(q_TNH, k_cache_BLKH, v_cache_BLKH, blocks(), scale, None, k_scale, v_scale, acc)


__all__ = ["invariant_block_sparse_attention", "invariant_block_sparse_select"]
