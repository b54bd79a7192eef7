"""QSA (Qwen3.8-Flash-Next's indexed attention, engine/models/qwen4_exp/qsa.py): the block selection and gated-GQA
attention over the selected positions. Plain-torch references (the contract, the test oracle and the CPU path);
triton_qsa.py is the attention's Triton kernel (the selection runs as the reference on every backend for now).

Legend: T query tokens in the flat batch, S sequences, N query heads, K kv heads, H head dim, Hv value head dim, Hi
index heads, Di index head dim, B pooled blocks, c compress ratio, X selected positions (budget + c - 1), L block size.

Selection (transformers' Qwen4ExpTextQSAIndexer): query token t at position p sees n = p + 1 positions, n // c complete
blocks of c; block b's key keys_SBD[s, b] (pooled, normed and roped by the caller) scores
    score[t, b] = sum_h relu(q[t, h] . key_b) / sqrt(Di)           (float32, as transformers)
and the top `block_topk` complete blocks (all of them when fewer) give their c positions each; the positions of the
incomplete last block [n // c * c, n) follow. Output int64 [T, X]: block picks (-1 where fewer blocks), then the tail
(-1 past n).
"""
from __future__ import annotations

import math

import torch

from .attention import AttentionMetadata
from .dsa import causal_lens


def token_seqs(meta: AttentionMetadata, device) -> torch.Tensor:
    """int64 [T]: each query token's sequence (from the host query lengths: no sync)."""
    qlen_S = torch.tensor(meta.query_lens, device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlen_S)


def cache_slots(meta: AttentionMetadata, seq_X: torch.Tensor, pos_X: torch.Tensor, L: int) -> torch.Tensor:
    """Flat cache slots of positions pos_X (>= 0) of sequences seq_X (blocks past a table's width: its last entry)."""
    tables = meta.block_tables_SM.long()
    block = (pos_X // L).clamp(max=tables.shape[1] - 1)
    return tables[seq_X, block] * L + pos_X % L


def reference_qsa_select(q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
                         compress_ratio: int) -> torch.Tensor:
    """The selected positions per query token (module docstring): int64 [T, block_topk * c + c - 1], -1 padded.
    keys_SBD: each sequence's first B = max_seq_len // c blocks' keys (rows past a sequence's complete blocks are
    never picked)."""
    T, c, device = q_THD.shape[0], compress_ratio, q_THD.device
    n_T = causal_lens(meta, device)
    nc_T = n_T // c
    picks = []
    B = keys_SBD.shape[1]
    if B > 0:
        seq_T = token_seqs(meta, device)
        dots_THB = torch.einsum("thd,tbd->thb", q_THD.float(), keys_SBD.float().index_select(0, seq_T))
        score_TB = torch.relu(dots_THB).sum(dim=1) / math.sqrt(q_THD.shape[-1])
        visible_TB = torch.arange(B, device=device)[None, :] < nc_T[:, None]
        kk = min(block_topk, B)
        top_Tk = score_TB.masked_fill(~visible_TB, float("-inf")).topk(kk, dim=1).indices
        top_Tk = torch.where(top_Tk < nc_T[:, None], top_Tk, -1)
        tok = top_Tk[:, :, None] * c + torch.arange(c, device=device)
        picks.append(torch.where(top_Tk[:, :, None] >= 0, tok, -1).view(T, kk * c))
        if kk < block_topk:  # a fixed width whatever the step's lengths
            picks.append(torch.full((T, (block_topk - kk) * c), -1, dtype=torch.long, device=device))
    else:
        picks.append(torch.full((T, block_topk * c), -1, dtype=torch.long, device=device))
    tail = nc_T[:, None] * c + torch.arange(c - 1, device=device)[None, :]
    picks.append(torch.where(tail < n_T[:, None], tail, -1))
    return torch.cat(picks, dim=1)


def reference_sparse_gqa_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                   meta: AttentionMetadata, pos_TX: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA where token t's heads attend to the cached K/V of its positions pos_TX[t] (>= 0; -1 is padding, anywhere
    in the row; every row has one at least) only: [T, N, Hv] in q's dtype; scores and softmax in float32 (float64
    for float64 inputs)."""
    T, N, H = q_TNH.shape
    L, K, Hv = k_cache_BLKH.shape[1], k_cache_BLKH.shape[2], v_cache_BLKH.shape[3]
    acc = torch.promote_types(q_TNH.dtype, torch.float32)
    valid_TX = pos_TX >= 0
    seq_TX = token_seqs(meta, q_TNH.device)[:, None].expand_as(pos_TX)
    slots = cache_slots(meta, seq_TX.reshape(-1), pos_TX.long().clamp(min=0).reshape(-1), L)
    k_TXKH = k_cache_BLKH.reshape(-1, K, H).index_select(0, slots).view(T, -1, K, H).to(acc)
    v_TXKH = v_cache_BLKH.reshape(-1, K, Hv).index_select(0, slots).view(T, -1, K, Hv).to(acc)
    q_TKGH = q_TNH.to(acc).view(T, K, N // K, H)
    s_TKGX = torch.einsum("tkgh,txkh->tkgx", q_TKGH, k_TXKH) * scale
    p = torch.softmax(s_TKGX.masked_fill(~valid_TX[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("tkgx,txkh->tkgh", p, v_TXKH).reshape(T, N, Hv).to(q_TNH.dtype)


__all__ = ["cache_slots", "reference_qsa_select", "reference_sparse_gqa_attention", "token_seqs"]
