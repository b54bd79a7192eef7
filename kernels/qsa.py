"""QSA (Qwen3.8-Flash-Next's indexed attention, engine/models/qwen4_exp/qsa.py): the block selection and gated-GQA
attention over the selected positions. Plain-torch references (the contract, the test oracle and the CPU path);
triton_qsa.py is the attention's Triton kernel; the selection's scores and top-k are DeepSeek Sparse Attention's
(`qsa_select`: its reference, or its Triton kernel on the Triton backend).

Legend: T query tokens in the flat batch, S sequences, N query heads, K kv heads, H head dim, Hv value head dim, Hi
index heads, Di index head dim, B pooled blocks, c compress ratio, X selected positions (budget + c - 1), L block size.

Selection (transformers' Qwen4ExpTextQSAIndexer): query token t at position p sees n = p + 1 positions, n // c complete
blocks of c; block b's key keys_SBD[s, b] (pooled, normed and roped by the caller) scores
    score[t, b] = sum_h relu(q[t, h] . key_b) / sqrt(Di)           (float32, as transformers)
and the top `block_topk` complete blocks (all of them when fewer) give their c positions each; the positions of the
incomplete last block [n // c * c, n) follow. Ties (blocks whose every relu term is 0 score exactly 0) go to the
lowest blocks, as DeepSeek Sparse Attention's selection breaks them; transformers breaks them as torch.topk happens
to (implementation-defined), so a parity test wants few zero scores (tests: 8 index heads). Output int64 [T, X]: block picks (-1 where fewer blocks), then the tail
(-1 past n).
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .dsa import causal_lens, reference_dsa_topk


def token_seqs(meta: AttentionMetadata, device) -> torch.Tensor:
    """int64 [T]: each query token's sequence (from the host query lengths: no sync)."""
    qlen_S = torch.tensor(meta.query_lens, device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlen_S)


def cache_slots(meta: AttentionMetadata, seq_X: torch.Tensor, pos_X: torch.Tensor, L: int) -> torch.Tensor:
    """Flat cache slots of positions pos_X (>= 0) of sequences seq_X (blocks past a table's width: its last entry)."""
    tables = meta.block_tables_SM.long()
    block = (pos_X // L).clamp(max=tables.shape[1] - 1)
    return tables[seq_X, block] * L + pos_X % L


# The pooled keys' cache block for the DSA top-k (any size: a block table covers each sequence's keys).
_KEY_BLOCK = 16


def qsa_select(dsa_topk, q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
               compress_ratio: int) -> torch.Tensor:
    """The selected positions per query token (module docstring): int64 [T, block_topk * c + c - 1], -1 padded.
    keys_SBD: each sequence's first B blocks' keys (rows past a sequence's complete blocks are never picked).

    The block scores and their top-k are DeepSeek Sparse Attention's indexer selection (`dsa_topk`: kernels/dsa.py's
    reference or the Triton kernel), unchanged: with weights 1 and scale 1 / sqrt(Di) its score is QSA's, since
    relu(a x) = a relu(x) for a > 0; the pooled keys are its key cache (sequence s's blocks in cache blocks of its
    own), and each query token is a sequence of one query whose context is its complete blocks, n // c (no host
    sync: the lengths stay on the device; the host ones are the bound B, as a decode row's may be)."""
    T, c, device = q_THD.shape[0], compress_ratio, q_THD.device
    n_T = causal_lens(meta, device)
    nc_T = n_T // c
    S, B, Di = keys_SBD.shape
    if B > 0:
        nb = -(-B // _KEY_BLOCK)
        keys = torch.zeros(S * nb + 1, _KEY_BLOCK, Di, dtype=keys_SBD.dtype, device=device)  # the last: null block
        keys[:-1].view(S, nb * _KEY_BLOCK, Di)[:, :B] = keys_SBD
        seq_T = token_seqs(meta, device)
        tables_TM = (seq_T[:, None] * nb + torch.arange(nb, device=device)[None, :]).to(torch.int32)
        one_each = AttentionMetadata(torch.arange(T + 1, dtype=torch.int32, device=device), nc_T.to(torch.int32),
                                     tables_TM, torch.zeros(T, dtype=torch.long, device=device), [1] * T, [B] * T,
                                     1, B, S * nb)
        weights_TH = torch.ones(q_THD.shape[:2], dtype=torch.float32, device=device)
        top_Tk = dsa_topk(q_THD, weights_TH, keys, one_each, block_topk, Di**-0.5, B).long()
        tok = top_Tk[:, :, None] * c + torch.arange(c, device=device)
        picks = torch.where(top_Tk[:, :, None] >= 0, tok, -1).view(T, block_topk * c)
    else:
        picks = torch.full((T, block_topk * c), -1, dtype=torch.long, device=device)
    tail = nc_T[:, None] * c + torch.arange(c - 1, device=device)[None, :]
    return torch.cat([picks, torch.where(tail < n_T[:, None], tail, -1)], dim=1)


def reference_qsa_select(q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
                         compress_ratio: int) -> torch.Tensor:
    """`qsa_select` over DSA's reference top-k."""
    return qsa_select(reference_dsa_topk, q_THD, keys_SBD, meta, block_topk, compress_ratio)


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


__all__ = ["cache_slots", "qsa_select", "reference_qsa_select", "reference_sparse_gqa_attention", "token_seqs"]
