"""Block-sparse attention (MiniMax-M3's sparse layers; engine/models/block_sparse_config.py has the definition):
the plain-torch references, the contract and the oracle of kernels/triton_block_sparse.py.

Two ops over the paged cache:
- `block_sparse_select`: per query token t and index head h, the ids of the key blocks (of `block_size` positions)
  it keeps: the `local_blocks` blocks ending at its own, then the best of the rest by the max over the block of
  q[t, h] . k[j] (float32, causal: j <= t's position), `topk_blocks` in all; int32 [T, H, topk_blocks], -1 in the
  slots past a query's count of blocks.
- `block_sparse_attention`: query head n of token t attends causally to the positions of the blocks
  blocks_TNK[t, n] holds (>= 0), and only to them; GQA's paged K/V cache ([B, L, K, H], [B, L, K, Hv]).

Legend: T tokens, N query heads, K kv heads, H head dim, Hv value head dim, I index head dim, B cache blocks, L cache
block size (the paged cache's, unrelated to the selection's block_size), W a sequence's positions, S topk_blocks.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .dsa import causal_lens


def token_seqs(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """int64 [T]: the sequence of each query token (from the host query lengths: no host sync)."""
    qlen_S = torch.tensor(meta.query_lens, device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlen_S)


def _positions(meta: AttentionMetadata, s: int, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence s's positions 0..W-1 (W its host length, a bound of the device one, within its block table) and
    their cache slots."""
    M = meta.block_tables_SM.shape[1]
    W = min(meta.seq_lens[s], M * L)
    pos_W = torch.arange(W, device=device)
    table_M = meta.block_tables_SM[s].long()
    return pos_W, table_M[pos_W // L] * L + pos_W % L


def reference_block_sparse_select(q_THI: torch.Tensor, index_cache_BLI: torch.Tensor, meta: AttentionMetadata,
                                  block_size: int, topk_blocks: int, local_blocks: int,
                                  max_len: int | None = None) -> torch.Tensor:
    """The blocks each (token, index head) keeps (module docstring): int32 [T, H, topk_blocks], -1 padded. q_THI the
    roped, normed index queries; index_cache_BLI holds this step's keys already. Ties between equal block scores
    go as torch.topk breaks them (transformers' own). `max_len` (the Triton kernel's workspace bound) is not needed
    here: the reference reads the host lengths and is never captured in a graph."""
    T, H, I = q_THI.shape
    L = index_cache_BLI.shape[1]
    out_THS = torch.full((T, H, topk_blocks), -1, dtype=torch.int32, device=q_THI.device)
    rows = index_cache_BLI.reshape(-1, I)
    vis_T = causal_lens(meta, q_THI.device)
    t0 = 0
    for s, ql in enumerate(meta.query_lens):
        if ql == 0:
            continue
        pos_W, slots_W = _positions(meta, s, L, q_THI.device)
        W = pos_W.numel()
        k_WI = rows.index_select(0, slots_W).float()
        s_QHW = torch.einsum("qhi,wi->qhw", q_THI[t0:t0 + ql].float(), k_WI)
        vis_Q = vis_T[t0:t0 + ql]
        s_QHW = s_QHW.masked_fill((pos_W[None, :] >= vis_Q[:, None])[:, None, :], float("-inf"))
        nb = -(-W // block_size)
        s_QHW = torch.nn.functional.pad(s_QHW, (0, nb * block_size - W), value=float("-inf"))
        b_QHB = s_QHW.view(ql, H, nb, block_size).amax(-1)
        own_Q = (vis_Q - 1) // block_size
        for back in range(local_blocks):  # forced in, as transformers does: +inf
            idx_Q = (own_Q - back).clamp(min=0)
            b_QHB.scatter_(-1, idx_Q[:, None, None].expand(ql, H, 1), float("inf"))
        k = min(topk_blocks, nb)
        vals_QHk, ids_QHk = b_QHB.topk(k, dim=-1)
        out_THS[t0:t0 + ql, :, :k] = ids_QHk.masked_fill(vals_QHk == float("-inf"), -1).to(torch.int32)
        t0 += ql
    return out_THS


def reference_block_sparse_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                     meta: AttentionMetadata, blocks_TNS: torch.Tensor, block_size: int,
                                     scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                                     group: int = 1) -> torch.Tensor:
    """Attention of each query head over its selected blocks only (module docstring): [T, N, Hv] in q's dtype;
    scores, softmax and P @ V in float32 (float64 for float64 inputs); an fp8 cache's values count as stored times
    their scale. `group` (runs of consecutive query heads that share their selection, the Triton kernel's unit of
    work) changes nothing here: every head reads its own row."""
    T, N, H = q_TNH.shape
    _, L, K, Hv = v_cache_BLKH.shape
    if blocks_TNS.dim() != 3 or tuple(blocks_TNS.shape[:2]) != (T, N):
        raise ValueError(f"blocks_TNS {tuple(blocks_TNS.shape)} is invalid: must be [{T}, {N}, topk_blocks].")
    acc = torch.promote_types(q_TNH.dtype, torch.float32)
    out_TNH = q_TNH.new_empty(T, N, Hv)
    k_rows = k_cache_BLKH.reshape(-1, K, H)
    v_rows = v_cache_BLKH.reshape(-1, K, Hv)
    vis_T = causal_lens(meta, q_TNH.device)
    t0 = 0
    for s, ql in enumerate(meta.query_lens):
        if ql == 0:
            continue
        pos_W, slots_W = _positions(meta, s, L, q_TNH.device)
        W = pos_W.numel()
        k_WNH = (k_rows.index_select(0, slots_W).to(acc) * k_scale).repeat_interleave(N // K, dim=1)
        v_WNH = (v_rows.index_select(0, slots_W).to(acc) * v_scale).repeat_interleave(N // K, dim=1)
        nb = -(-W // block_size)
        sel_QNS = blocks_TNS[t0:t0 + ql].long()
        keep_QNB = torch.zeros(ql, N, nb + 1, dtype=torch.bool, device=q_TNH.device)
        keep_QNB.scatter_(-1, torch.where(sel_QNS >= 0, sel_QNS.clamp(max=nb), nb), True)
        keep_QNW = keep_QNB[..., :nb].repeat_interleave(block_size, dim=-1)[..., :W]
        keep_QNW = keep_QNW & (pos_W[None, :] < vis_T[t0:t0 + ql, None])[:, None, :]
        s_QNW = torch.einsum("qnh,wnh->qnw", q_TNH[t0:t0 + ql].to(acc), k_WNH) * scale
        p_QNW = torch.softmax(s_QNW.masked_fill(~keep_QNW, float("-inf")), dim=-1)
        out_TNH[t0:t0 + ql] = torch.einsum("qnw,wnh->qnh", p_QNW, v_WNH).to(out_TNH.dtype)
        t0 += ql
    return out_TNH


__all__ = ["reference_block_sparse_attention", "reference_block_sparse_select", "token_seqs"]
