"""Attention over the paged KV cache: metadata, KV write, and the plain-torch reference.

Legend: T query tokens in the flattened batch, S sequences, N query heads,
K kv heads, H head dim, B cache blocks, L block size (tokens per block),
M max blocks per sequence, C context length.

Cache layout per layer: k_cache_BLKH / v_cache_BLKH = [num_blocks + 1, block_size, K, H];
the extra last block is the null block (see AttentionMetadata.null_block).
Token p of a sequence lives in block `block_table[p // L]` at offset `p % L`;
its flat slot is `block * L + offset`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the flat batch and where its KV lives.

    Device tensors feed the kernels; the host lists are kept because the
    runner builds them on the host anyway, so the CPU path reads them without
    a device→host sync.
    """

    query_start_loc_S1: torch.Tensor  # int32 [S + 1], cumulative query lengths
    seq_lens_S: torch.Tensor  # int32 [S], context length after this step's tokens
    block_tables_SM: torch.Tensor  # int32 [S, M], padded with 0
    slot_mapping_T: torch.Tensor  # int64 [T], flat cache slot of each new token
    query_lens: list[int]
    seq_lens: list[int]
    max_query_len: int
    max_seq_len: int
    # A cache block that is never allocated and stays zero: padded reads land there.
    null_block: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def reference_write_kv(
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    k_cache_BLKH: torch.Tensor,
    v_cache_BLKH: torch.Tensor,
    slot_mapping_T: torch.Tensor,
) -> None:
    """Scatter this step's keys and values into their cache slots (in place); slots < 0 are
    padding tokens whose K/V go nowhere, as in the Triton kernel."""
    num_kv_heads, head_dim = k_TKH.shape[1], k_TKH.shape[2]
    # No host sync: padding rows write zeros into the null block (the cache's last block), which
    # stays all zeros as every reader expects.
    keep_T = slot_mapping_T >= 0
    null_slot = (k_cache_BLKH.shape[0] - 1) * k_cache_BLKH.shape[1]
    slot_mapping_T = torch.where(keep_T, slot_mapping_T, torch.full_like(slot_mapping_T, null_slot))
    k_TKH = torch.where(keep_T[:, None, None], k_TKH, torch.zeros((), dtype=k_TKH.dtype, device=k_TKH.device))
    v_TKH = torch.where(keep_T[:, None, None], v_TKH, torch.zeros((), dtype=v_TKH.dtype, device=v_TKH.device))
    k_cache_BLKH.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping_T, k_TKH)
    v_cache_BLKH.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping_T, v_TKH)


def reference_paged_attention(
    q_TNH: torch.Tensor,
    k_cache_BLKH: torch.Tensor,
    v_cache_BLKH: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each new token to its sequence's cached context.

    The query at position p (= seq_len - query_len + i) sees keys [0, p].
    Single-token (decode) sequences are batched into one padded call; each
    multi-token chunk runs on its own, so no padding is wasted on long chunks.
    Returns [T, N, H] in q's dtype.
    """
    out_TNH = torch.empty_like(q_TNH)
    starts = list(itertools.accumulate(meta.query_lens, initial=0))
    decode_seqs = [s for s, n in enumerate(meta.query_lens) if n == 1]
    if decode_seqs:
        _decode_batch(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, decode_seqs, starts, out_TNH)
    for s, qlen in enumerate(meta.query_lens):
        if qlen == 1:
            continue
        start, ctx = starts[s], meta.seq_lens[s]
        k_CKH, v_CKH = _gather_context(k_cache_BLKH, v_cache_BLKH, meta.block_tables_SM[s], ctx)
        q_1NQH = q_TNH[start : start + qlen].transpose(0, 1).unsqueeze(0)
        if ctx == qlen:
            mask_QC = None  # no cached prefix: plain causal, which SDPA runs without a mask
        else:
            key_pos_C = torch.arange(ctx, device=q_TNH.device)
            query_pos_Q = torch.arange(ctx - qlen, ctx, device=q_TNH.device)
            mask_QC = key_pos_C[None, :] <= query_pos_Q[:, None]
        o_1NQH = _sdpa(q_1NQH, k_CKH.transpose(0, 1).unsqueeze(0), v_CKH.transpose(0, 1).unsqueeze(0), mask_QC, scale)
        out_TNH[start : start + qlen] = o_1NQH[0].transpose(0, 1)
    return out_TNH


# Decode sequences are processed in groups of similar length, so padding each
# group to its longest context wastes little.
_DECODE_GROUP = 32


def _decode_batch(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, seqs, starts, out_TNH) -> None:
    seqs = sorted(seqs, key=lambda s: meta.seq_lens[s])
    for i in range(0, len(seqs), _DECODE_GROUP):
        _decode_group(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, seqs[i : i + _DECODE_GROUP], starts, out_TNH)


def decode_group_slots(meta: AttentionMetadata, seqs: list[int], starts: list[int], block_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a group of decode sequences sorted by length (reference paths of GQA and MLA attention):
    (tok_idx_S: each sequence's query row, slots_SC: the flat cache slot of every context position up to the
    longest, valid_SC: which positions are inside their sequence). Positions past a sequence's end point
    at the null block, which is all zeros, so stale or NaN data is never read."""
    max_ctx = meta.seq_lens[seqs[-1]]
    seq_idx_S = torch.tensor(seqs, device=device, dtype=torch.long)
    tok_idx_S = torch.tensor([starts[s] for s in seqs], device=device, dtype=torch.long)
    lens_S = torch.tensor([meta.seq_lens[s] for s in seqs], device=device)
    pos_C = torch.arange(max_ctx, device=device)
    tables_SM = meta.block_tables_SM.index_select(0, seq_idx_S).long()
    blocks_SC = tables_SM.index_select(1, pos_C // block_size)
    valid_SC = pos_C[None, :] < lens_S[:, None]
    slots_SC = torch.where(valid_SC, blocks_SC * block_size + pos_C % block_size, meta.null_block * block_size)
    return tok_idx_S, slots_SC, valid_SC


def _decode_group(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, seqs, starts, out_TNH) -> None:
    block_size, num_kv_heads, head_dim = k_cache_BLKH.shape[1:]
    S = len(seqs)
    tok_idx_S, slots_SC, valid_SC = decode_group_slots(meta, seqs, starts, block_size, q_TNH.device)
    max_ctx = slots_SC.shape[1]
    flat = slots_SC.reshape(-1)
    k_SCKH = k_cache_BLKH.view(-1, num_kv_heads, head_dim).index_select(0, flat).view(S, max_ctx, num_kv_heads, head_dim)
    v_SCKH = v_cache_BLKH.view(-1, num_kv_heads, head_dim).index_select(0, flat).view(S, max_ctx, num_kv_heads, head_dim)
    # GQA without copying K/V per query head: one batched matmul per kv head, over
    # strided views of the gathered K/V (BLAS reads them in place).
    rep = q_TNH.shape[1] // num_kv_heads
    q_SKRH = q_TNH.index_select(0, tok_idx_S).view(S, num_kv_heads, rep, head_dim)
    mask_S1C = ~valid_SC[:, None, :]
    out_SKRH = q_SKRH.new_empty(S, num_kv_heads, rep, head_dim)
    for h in range(num_kv_heads):
        scores_SRC = torch.bmm(q_SKRH[:, h], k_SCKH[:, :, h].transpose(1, 2)) * scale
        probs_SRC = torch.softmax(scores_SRC.masked_fill_(mask_S1C, float("-inf")), dim=-1)
        out_SKRH[:, h] = torch.bmm(probs_SRC, v_SCKH[:, :, h])
    out_TNH.index_copy_(0, tok_idx_S, out_SKRH.view(S, -1, head_dim))


def _gather_context(k_cache_BLKH, v_cache_BLKH, block_table_M, ctx: int):
    block_size = k_cache_BLKH.shape[1]
    blocks = block_table_M[: -(-ctx // block_size)].long()
    k_CKH = k_cache_BLKH.index_select(0, blocks).flatten(0, 1)[:ctx]
    v_CKH = v_cache_BLKH.index_select(0, blocks).flatten(0, 1)[:ctx]
    return k_CKH, v_CKH


def _sdpa(q_BNQH, k_BKCH, v_BKCH, mask, scale: float) -> torch.Tensor:
    # GQA by repeating kv heads: `enable_gqa` is not on every torch we support.
    rep = q_BNQH.shape[1] // k_BKCH.shape[1]
    if rep > 1:
        k_BKCH = k_BKCH.repeat_interleave(rep, dim=1)
        v_BKCH = v_BKCH.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q_BNQH, k_BKCH, v_BKCH, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q_BNQH, k_BKCH, v_BKCH, attn_mask=mask, scale=scale)
