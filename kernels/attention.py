"""Attention over the paged KV cache: metadata, KV write, and the plain-torch reference.

Legend: T query tokens in the flattened batch, S sequences, N query heads,
K kv heads, H head dim, Hv value head dim, B cache blocks, L block size (tokens per block),
M max blocks per sequence, C context length.

Cache layout per layer: k_cache_BLKH = [num_blocks + 1, block_size, K, H], v_cache_BLKH the same with Hv
(= H, except MiMo-V2-Flash's narrower values: the output is [T, N, Hv]);
the extra last block is the null block (see AttentionMetadata.null_block).
Token p of a sequence lives in block `block_table[p // L]` at offset `p % L`;
its flat slot is `block * L + offset`.

Two optional per-layer arguments (gpt-oss), None = plain causal softmax attention:
- sinks_N: a learned logit per query head that joins every softmax's denominator and has no value:
  out = Σ_j e^(s_j) v_j / (Σ_j e^(s_j) + e^(sink)).
- sliding_window W: the query at position p sees keys (p - W, p] only, the last W positions, itself included
  (transformers' sliding_window_overlay: kv_idx > q_idx - W).

An fp8 cache (`--kv-cache-dtype fp8`: float8_e4m3fn K and V) stores k / k_scale and v / v_scale, saturated to
e4m3's ±448, with one float scale each per layer (1.0 unless the checkpoint ships `k_scale` / `v_scale`);
readers widen the stored values to the query's dtype and multiply the scales back in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu_reads import cpu_item
from .decode_plan import GroupPlan, decode_plans, step_partition
from .prompt_plan import PromptGroup, fresh_prompts, prompt_groups
from .step_memo import STEP_MEMO

FP8_CACHE_DTYPES = (torch.float8_e4m3fn,)


def quantize_for_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What a cache of `cache_dtype` stores for x: x itself (cast), or for fp8 x / scale saturated to the
    format's range (a bare cast would turn an out-of-range value into NaN)."""
    if cache_dtype not in FP8_CACHE_DTYPES:
        return x if x.dtype == cache_dtype else x.to(cache_dtype)  # (a same-dtype .to is still an op to dispatch)
    fp8_max = torch.finfo(cache_dtype).max
    return (x.to(torch.float32) / scale).clamp(-fp8_max, fp8_max).to(cache_dtype)


def dequantize_from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cached values as `dtype` (the query's): fp8 ones widened and multiplied by their scale."""
    if x.dtype not in FP8_CACHE_DTYPES:
        return x
    return x.to(dtype) * scale


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the flat batch and where its KV lives.

    Device tensors feed the kernels; the host lists are kept because the
    runner builds them on the host anyway, so the CPU path reads them without
    a device→host sync. For decode rows (query length 1) the host `seq_lens` may be upper bounds: every kernel
    reads such a row's length from `seq_lens_S` (the decode graphs, and the MTP drafter's chained steps, whose
    lengths depend on the tokens the step accepted on the device: engine/spec/proposer/mtp.py).
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

    def select(self, s0: int, s1: int) -> "AttentionMetadata":
        """Sequences [s0, s1) as a batch of their own (a micro-batch: their tokens are contiguous in the flat
        batch). Device tensors are sliced on the device and the lengths come from the host lists: no host sync.
        Needs s0 < s1 (an empty batch has no metadata)."""
        if not 0 <= s0 < s1 <= self.num_seqs:
            raise ValueError(f"AttentionMetadata.select({s0}, {s1}) needs 0 <= s0 < s1 <= {self.num_seqs}.")
        t0 = sum(self.query_lens[:s0])
        query_lens, seq_lens = self.query_lens[s0:s1], self.seq_lens[s0:s1]
        qsl_S1 = self.query_start_loc_S1[s0 : s1 + 1]
        return dataclasses.replace(
            self, query_start_loc_S1=qsl_S1 - qsl_S1[:1], seq_lens_S=self.seq_lens_S[s0:s1],
            block_tables_SM=self.block_tables_SM[s0:s1], slot_mapping_T=self.slot_mapping_T[t0 : t0 + sum(query_lens)],
            query_lens=query_lens, seq_lens=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def reference_write_kv(
    k_TKH: torch.Tensor,
    v_TKH: torch.Tensor,
    k_cache_BLKH: torch.Tensor,
    v_cache_BLKH: torch.Tensor,
    slot_mapping_T: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter this step's keys and values into their cache slots (in place); slots < 0 are
    padding tokens whose K/V go nowhere, as in the Triton kernel. An fp8 cache stores k / k_scale and
    v / v_scale (module docstring)."""
    num_kv_heads, head_dim, v_head_dim = k_TKH.shape[1], k_TKH.shape[2], v_TKH.shape[2]
    if not _all_slots_valid(slot_mapping_T):
        k_TKH, v_TKH, slot_mapping_T = _null_padding(k_TKH, v_TKH, slot_mapping_T, k_cache_BLKH)
    k_TKH = quantize_for_cache(k_TKH, k_cache_BLKH.dtype, k_scale)
    v_TKH = quantize_for_cache(v_TKH, v_cache_BLKH.dtype, v_scale)
    if k_cache_BLKH.dtype in FP8_CACHE_DTYPES:  # torch has no fp8 index_copy_ on CPU: copy the bytes
        k_cache_BLKH, k_TKH = k_cache_BLKH.view(torch.uint8), k_TKH.view(torch.uint8)
        v_cache_BLKH, v_TKH = v_cache_BLKH.view(torch.uint8), v_TKH.view(torch.uint8)
    k_cache_BLKH.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping_T, k_TKH)
    v_cache_BLKH.view(-1, num_kv_heads, v_head_dim).index_copy_(0, slot_mapping_T, v_TKH)


def _all_slots_valid(slot_mapping_T: torch.Tensor) -> bool:
    """Whether no token of the step is padding (slot < 0), known without a device sync: on a CPU it is read once
    per step (kernels/step_memo.py); elsewhere the answer is "maybe not" and the masked write runs."""
    if slot_mapping_T.device.type != "cpu":
        return False
    return STEP_MEMO.get("slots_valid", (slot_mapping_T,), None,
                         lambda: slot_mapping_T.numel() == 0 or cpu_item(slot_mapping_T.min()) >= 0)


def _null_padding(k_TKH, v_TKH, slot_mapping_T, k_cache_BLKH):
    """Padding tokens (slot < 0) pointed at the null block with zero K/V. No host sync: padding rows write zeros
    into the null block (the cache's last block), which stays all zeros as every reader expects."""
    keep_T = slot_mapping_T >= 0
    null_slot = (k_cache_BLKH.shape[0] - 1) * k_cache_BLKH.shape[1]
    slot_mapping_T = torch.where(keep_T, slot_mapping_T, torch.full_like(slot_mapping_T, null_slot))
    k_TKH = torch.where(keep_T[:, None, None], k_TKH, torch.zeros((), dtype=k_TKH.dtype, device=k_TKH.device))
    v_TKH = torch.where(keep_T[:, None, None], v_TKH, torch.zeros((), dtype=v_TKH.dtype, device=v_TKH.device))
    return k_TKH, v_TKH, slot_mapping_T


def reference_paged_attention(
    q_TNH: torch.Tensor,
    k_cache_BLKH: torch.Tensor,
    v_cache_BLKH: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sinks_N: torch.Tensor | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each new token to its sequence's cached context.

    The query at position p (= seq_len - query_len + i) sees keys [0, p], or (p - sliding_window, p] with a
    window; sinks_N (float [N]) adds each head's sink logit to the softmax denominator (module docstring); an
    fp8 cache's values count as stored * k_scale / v_scale.
    Single-token (decode) sequences are batched into one padded call; each
    multi-token chunk runs on its own, so no padding is wasted on long chunks.
    Returns [T, N, Hv] in q's dtype (Hv: the V cache's head dim, H but for narrower values).
    """
    _check_extras(q_TNH, sinks_N, sliding_window)
    starts, decode_seqs, chunk_seqs = step_partition(meta)
    if decode_seqs and not chunk_seqs and sinks_N is None:
        plans = decode_plans(meta, decode_seqs, starts, k_cache_BLKH.shape[1], sliding_window, q_TNH.device)
        if len(plans) == 1 and plans[0].tok_idx_S is None:  # the batch in its order, one group: SDPA's output is it
            return _decode_sdpa(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, plans[0], (k_scale, v_scale)).squeeze(2)
    out_TNH = q_TNH.new_empty(*q_TNH.shape[:2], v_cache_BLKH.shape[-1])
    if decode_seqs:
        _decode_batch(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, decode_seqs, starts, out_TNH, sinks_N,
                      sliding_window, (k_scale, v_scale))
    if len(chunk_seqs) > 1 and sliding_window is None and sinks_N is None and q_TNH.device.type == "cpu":
        fresh = fresh_prompts(meta, chunk_seqs)
        if len(fresh) > 1:
            grouped = set()
            for group in prompt_groups(meta, fresh, starts, k_cache_BLKH.shape[1], q_TNH.device):
                _prompt_group(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, group, out_TNH, (k_scale, v_scale))
                grouped.update(group.seqs)
            chunk_seqs = [s for s in chunk_seqs if s not in grouped]
    for s in chunk_seqs:
        qlen = meta.query_lens[s]
        start, ctx = starts[s], meta.seq_lens[s]
        # A window needs only the keys the chunk's first query sees onwards: a long context is not gathered whole.
        lo = 0 if sliding_window is None else max(0, ctx - qlen - sliding_window + 1)
        k_CKH, v_CKH = _gather_context(k_cache_BLKH, v_cache_BLKH, meta.block_tables_SM[s], ctx, lo)
        k_CKH = dequantize_from_cache(k_CKH, q_TNH.dtype, k_scale)
        v_CKH = dequantize_from_cache(v_CKH, q_TNH.dtype, v_scale)
        q_1NQH = q_TNH[start : start + qlen].transpose(0, 1).unsqueeze(0)
        if ctx == qlen and sliding_window is None:
            mask_QC = None  # no cached prefix: plain causal, which SDPA runs without a mask
        else:
            key_pos_C = torch.arange(lo, ctx, device=q_TNH.device)
            query_pos_Q = torch.arange(ctx - qlen, ctx, device=q_TNH.device)
            mask_QC = key_pos_C[None, :] <= query_pos_Q[:, None]
            if sliding_window is not None:
                mask_QC &= key_pos_C[None, :] > query_pos_Q[:, None] - sliding_window
        k_1KCH, v_1KCH = k_CKH.transpose(0, 1).unsqueeze(0), v_CKH.transpose(0, 1).unsqueeze(0)
        if sinks_N is None:
            o_1NQH = _sdpa(q_1NQH, k_1KCH, v_1KCH, mask_QC, scale)
        else:
            o_1NQH = _attend_with_sinks(q_1NQH, k_1KCH, v_1KCH, mask_QC, scale, sinks_N)
        out_TNH[start : start + qlen] = o_1NQH[0].transpose(0, 1)
    return out_TNH


def _prompt_group(q_TNH, k_cache_BLKH, v_cache_BLKH, scale: float, group: PromptGroup, out_TNH,
                  kv_scales=(1.0, 1.0)) -> None:
    """One group of fresh prompt chunks (kernels/prompt_plan.py): causal SDPA over [G, N, Q, H], the real rows
    written back."""
    G, Q = len(group.seqs), group.width
    k_GCKH, v_GCKH = _gathered(group.keys, k_cache_BLKH, v_cache_BLKH, q_TNH.dtype, kv_scales)
    k_GQKH, v_GQKH = k_GCKH[:, :Q], v_GCKH[:, :Q]
    r0 = group.first_row
    q_XNH = q_TNH[r0 : r0 + G * Q] if r0 is not None else q_TNH.index_select(0, group.rows_X)
    q_GNQH = q_XNH.view(G, Q, *q_TNH.shape[1:]).transpose(1, 2)
    o_GNQH = _sdpa(q_GNQH, k_GQKH.transpose(1, 2), v_GQKH.transpose(1, 2), None, scale)
    o_GQNH = o_GNQH.transpose(1, 2)
    if r0 is not None:
        out_TNH[r0 : r0 + G * Q].view(G, Q, *out_TNH.shape[1:]).copy_(o_GQNH)
        return
    o_XNH = o_GQNH.reshape(G * Q, *o_GQNH.shape[2:])
    out_TNH.index_copy_(0, group.out_Y, o_XNH if group.keep_Y is None else o_XNH.index_select(0, group.keep_Y))


def _check_extras(q_TNH: torch.Tensor, sinks_N: torch.Tensor | None, sliding_window: int | None) -> None:
    """One clear error for a malformed per-layer argument (shared by the reference and the Triton wrapper)."""
    if sinks_N is not None and (sinks_N.dim() != 1 or sinks_N.shape[0] != q_TNH.shape[1]):
        raise ValueError(f"sinks_N {tuple(sinks_N.shape)} is invalid: must be one logit per query head, [{q_TNH.shape[1]}].")
    if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be None or a positive integer.")


def _with_sinks_softmax(scores_XC: torch.Tensor, sinks_X1: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys with one more logit per row (its sink) in the denominator, dropped after: as
    transformers' gpt-oss eager attention (max subtracted over keys and sink together)."""
    combined = torch.cat([scores_XC, sinks_X1.to(scores_XC.dtype).expand(*scores_XC.shape[:-1], 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1)[..., :-1]


def _attend_with_sinks(q_BNQH, k_BKCH, v_BKCH, mask_QC, scale: float, sinks_N) -> torch.Tensor:
    rep = q_BNQH.shape[1] // k_BKCH.shape[1]
    if rep > 1:
        k_BKCH = k_BKCH.repeat_interleave(rep, dim=1)
        v_BKCH = v_BKCH.repeat_interleave(rep, dim=1)
    scores_BNQC = torch.matmul(q_BNQH, k_BKCH.transpose(2, 3)) * scale
    Q, C = scores_BNQC.shape[-2:]
    if mask_QC is None:  # plain causal over a chunk with no cached prefix (C == Q)
        mask_QC = torch.ones(Q, C, dtype=torch.bool, device=q_BNQH.device).tril()
    scores_BNQC = scores_BNQC.masked_fill(~mask_QC, float("-inf"))
    probs_BNQC = _with_sinks_softmax(scores_BNQC, sinks_N[None, :, None, None])
    return torch.matmul(probs_BNQC.to(v_BKCH.dtype), v_BKCH)


def _decode_batch(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, seqs, starts, out_TNH, sinks_N=None,
                  window=None, kv_scales=(1.0, 1.0)) -> None:
    for plan in decode_plans(meta, seqs, starts, k_cache_BLKH.shape[1], window, q_TNH.device):
        _decode_group(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, plan, out_TNH, sinks_N, kv_scales)


def _gathered(plan: GroupPlan, k_cache_BLKH, v_cache_BLKH, dtype: torch.dtype, kv_scales
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's keys and values [S, C, K, H] / [S, C, K, Hv] of `dtype` (an fp8 cache's widened and scaled back)."""
    k_SCKH, v_SCKH = plan.gather(k_cache_BLKH, v_cache_BLKH)
    return dequantize_from_cache(k_SCKH, dtype, kv_scales[0]), dequantize_from_cache(v_SCKH, dtype, kv_scales[1])


def _decode_sdpa(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, plan: GroupPlan, kv_scales) -> torch.Tensor:
    """One group's attention without sinks: [S, N, 1, Hv] (rows in the group's order)."""
    k_SCKH, v_SCKH = _gathered(plan, k_cache_BLKH, v_cache_BLKH, q_TNH.dtype, kv_scales)
    q_SNH = q_TNH if plan.tok_idx_S is None else q_TNH.index_select(0, plan.tok_idx_S)
    return F.scaled_dot_product_attention(q_SNH.unsqueeze(2), k_SCKH.transpose(1, 2), v_SCKH.transpose(1, 2),
                                          attn_mask=plan.mask_S11C, scale=scale, enable_gqa=True)


def _decode_group(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, plan: GroupPlan, out_TNH, sinks_N=None,
                  kv_scales=(1.0, 1.0)) -> None:
    num_kv_heads, head_dim = k_cache_BLKH.shape[2:]
    v_head_dim = v_cache_BLKH.shape[-1]
    tok_idx_S = plan.tok_idx_S
    S = plan.valid_SC.shape[0]
    if sinks_N is None:
        out_SN1H = _decode_sdpa(q_TNH, k_cache_BLKH, v_cache_BLKH, scale, plan, kv_scales)
        if tok_idx_S is None:
            out_TNH.copy_(out_SN1H.squeeze(2))
        else:
            out_TNH.index_copy_(0, tok_idx_S, out_SN1H.squeeze(2))
        return
    k_SCKH, v_SCKH = _gathered(plan, k_cache_BLKH, v_cache_BLKH, q_TNH.dtype, kv_scales)
    q_SNH = q_TNH if tok_idx_S is None else q_TNH.index_select(0, tok_idx_S)
    # GQA without copying K/V per query head: one batched matmul per kv head, over
    # strided views of the gathered K/V (BLAS reads them in place).
    rep = q_TNH.shape[1] // num_kv_heads
    q_SKRH = q_SNH.reshape(S, num_kv_heads, rep, head_dim)
    mask_S1C = ~plan.valid_SC[:, None, :]
    out_SKRH = q_SKRH.new_empty(S, num_kv_heads, rep, v_head_dim)
    sinks_KR = None if sinks_N is None else sinks_N.view(num_kv_heads, rep)
    for h in range(num_kv_heads):
        scores_SRC = torch.bmm(q_SKRH[:, h], k_SCKH[:, :, h].transpose(1, 2)) * scale
        scores_SRC = scores_SRC.masked_fill_(mask_S1C, float("-inf"))
        if sinks_KR is None:
            probs_SRC = torch.softmax(scores_SRC, dim=-1)
        else:
            probs_SRC = _with_sinks_softmax(scores_SRC, sinks_KR[h][None, :, None]).to(v_SCKH.dtype)
        out_SKRH[:, h] = torch.bmm(probs_SRC, v_SCKH[:, :, h])
    if tok_idx_S is None:
        out_TNH.copy_(out_SKRH.view(S, -1, v_head_dim))
    else:
        out_TNH.index_copy_(0, tok_idx_S, out_SKRH.view(S, -1, v_head_dim))


def _gather_context(k_cache_BLKH, v_cache_BLKH, block_table_M, ctx: int, lo: int = 0):
    """Keys and values of positions [lo, ctx) of one sequence."""
    block_size = k_cache_BLKH.shape[1]
    first = lo // block_size
    blocks = block_table_M[first : -(-ctx // block_size)].long()
    skip = lo - first * block_size
    k_CKH = k_cache_BLKH.index_select(0, blocks).flatten(0, 1)[skip : ctx - first * block_size]
    v_CKH = v_cache_BLKH.index_select(0, blocks).flatten(0, 1)[skip : ctx - first * block_size]
    return k_CKH, v_CKH


def _sdpa(q_BNQH, k_BKCH, v_BKCH, mask, scale: float) -> torch.Tensor:
    # GQA in SDPA itself (torch >= 2.5; we need 2.8): no copy of the keys and values per query head.
    if mask is None:
        return F.scaled_dot_product_attention(q_BNQH, k_BKCH, v_BKCH, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q_BNQH, k_BKCH, v_BKCH, attn_mask=mask, scale=scale, enable_gqa=True)
