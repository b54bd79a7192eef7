"""Multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi K2) over a paged latent cache: the plain-torch reference.

Legend: T query tokens in the flat batch, S sequences, N query heads, C latent width (kv_lora_rank, 512 in
DeepSeek-V3), P rope key width (qk_rope_head_dim, 64), R = C + P values cached per token, B cache blocks,
L block size (tokens per block), M max blocks per sequence, X context length, Q query length of one
sequence, Dn / Dv per-head nope-key / value widths (qk_nope_head_dim / v_head_dim, 128 / 128).

Cache layout per layer: latent_cache_BLR = [num_blocks + 1, L, R]. Row r of a token holds its normalised
latent c_kv in [0, C) and its roped key k_pe in [C, R): one row per token shared by every head, not a K and
a V per head (576 values per token for DeepSeek-V3 instead of 2 * 128 heads * 128). The last block is the
null block and stays zero; token p of a sequence lives at slot `block_table[p // L] * L + p % L`, as in
attention.py, whose `AttentionMetadata` these functions take unchanged.

Absorbed attention (what runs here, for decode and prefill alike). `kv_b_proj` maps the latent to each
head's nope key and value: its weight, viewed [N, Dn + Dv, C], splits into W_UK = w[:, :Dn] ([N, Dn, C])
and W_UV = w[:, Dn:] ([N, Dv, C]), so k_nope[n] = c_kv @ W_UK[n]^T and v[n] = c_kv @ W_UV[n]^T. Then
    q_nope[n] · k_nope[n] = (q_nope[n] @ W_UK[n]) · c_kv   and   P @ v[n] = (P @ c_kv) @ W_UV[n]^T,
so the caller absorbs W_UK into the query and W_UV into the output and attention runs in latent space:
    q_latent[n] = q_nope[n] @ W_UK[n]                  [Dn] @ [Dn, C] -> [C]
    score[n, j] = q_latent[n] · c_kv[j] + q_pe[n] · k_pe[j]
    out_latent[n] = softmax(score[n] * scale) @ c_kv   -> [C]
    o[n] = out_latent[n] @ W_UV[n]^T                   [C] @ [C, Dv] -> [Dv]
with scale = the model's softmax_scale: 1 / sqrt(Dn + P), times yarn's mscale^2 when rope scaling sets one
(the caller computes it). Every head reads the same cache row, which makes MLA decode multi-query attention
with one 576-wide key (its first 512 values also the value): the kernels read each token's row once for a
group of heads, not once per head. A long prompt may instead expand K and V per head (fewer flops per
score: Dn + P instead of C + P); these functions are the absorbed path, correct for any mix of decode tokens
and prefill chunks over a cached prefix.
"""
from __future__ import annotations

import itertools

import torch

from .attention import FP8_CACHE_DTYPES, AttentionMetadata, quantize_for_cache
from .decode_plan import decode_group_slots

# A cache may hold its rows in float8 e4m3 (`--kv-cache-dtype fp8`): a row is stored as row / kv_scale and
# read back as stored * kv_scale, with one float scale per layer (1.0 unless the checkpoint ships one). Both
# uses of a row are linear in it, so the Triton kernel folds the scale into the softmax scale (scores) and the
# output (P @ c_kv) instead of rescaling every loaded row.


def check_latent_cache(name: str, latent_cache_BLR: torch.Tensor, width: int) -> None:
    """A contiguous [blocks, L, width] cache, or a ValueError naming the argument."""
    if latent_cache_BLR.dim() != 3 or latent_cache_BLR.shape[2] != width or not latent_cache_BLR.is_contiguous():
        raise ValueError(f"{name} {tuple(latent_cache_BLR.shape)} is invalid: must be a contiguous [blocks, block_size, "
                         f"{width}] tensor (kv_lora_rank + qk_rope_head_dim values per token).")


def check_mla_inputs(q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor) -> None:
    """The shape and dtype checks shared by the reference and the Triton wrapper."""
    if q_latent_TNC.dim() != 3 or q_pe_TNP.dim() != 3 or q_pe_TNP.shape[:2] != q_latent_TNC.shape[:2]:
        raise ValueError(f"q_latent_TNC {tuple(q_latent_TNC.shape)} and q_pe_TNP {tuple(q_pe_TNP.shape)} are invalid: "
                         "must be [T, N, kv_lora_rank] and [T, N, qk_rope_head_dim] with the same T and N.")
    cache_dt = latent_cache_BLR.dtype
    if q_pe_TNP.dtype != q_latent_TNC.dtype or (cache_dt != q_latent_TNC.dtype and cache_dt not in FP8_CACHE_DTYPES):
        raise ValueError(f"dtypes q_latent_TNC={q_latent_TNC.dtype}, q_pe_TNP={q_pe_TNP.dtype}, "
                         f"latent_cache_BLR={cache_dt} are invalid: the queries must share one dtype, and the cache "
                         "must have it too or be float8_e4m3fn (an fp8 KV cache).")
    check_latent_cache("latent_cache_BLR", latent_cache_BLR, q_latent_TNC.shape[2] + q_pe_TNP.shape[2])


def check_sinks(sinks_N: torch.Tensor | None, num_heads: int) -> None:
    """None, or one float sink logit per head (MLAConfig.sinks), else a ValueError naming the argument."""
    if sinks_N is not None and (sinks_N.dim() != 1 or sinks_N.shape[0] != num_heads or not sinks_N.is_floating_point()):
        raise ValueError(f"sinks_N {tuple(sinks_N.shape)} {sinks_N.dtype} is invalid: must be a float [{num_heads}] "
                         "tensor, one sink logit per head (or None).")


def softmax_with_sinks(scores_XNY: torch.Tensor, sinks_N: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim, heads on dim 1; with sinks, each head's sink logit joins the denominator and its
    own share is dropped (transformers' gpt-oss eager attention, which Hunyuan Hy4 runs): the probabilities of a row
    sum to 1 / (1 + exp(sink) / sum(exp(scores))). A fully masked row (no keys) stays all zeros with sinks, NaN
    without (the callers never make one)."""
    if sinks_N is None:
        return torch.softmax(scores_XNY, dim=-1)
    sink_XN1 = sinks_N.to(scores_XNY.dtype).view(1, -1, 1).expand(scores_XNY.shape[0], -1, 1)
    return torch.softmax(torch.cat([scores_XNY, sink_XN1], dim=-1), dim=-1)[..., :-1]


def reference_write_latent(
    ckv_TC: torch.Tensor,
    kpe_TP: torch.Tensor,
    latent_cache_BLR: torch.Tensor,
    slot_mapping_T: torch.Tensor,
    kv_scale: float = 1.0,
) -> None:
    """Scatter this step's latents [T, C] and roped keys [T, P] into their cache rows (in place).

    Slots < 0 are padding tokens whose rows go nowhere, as in the Triton kernel. An fp8 cache stores
    row / kv_scale, saturated to e4m3's ±448 (a cast alone would turn an out-of-range value into NaN).
    """
    T, C = ckv_TC.shape
    check_latent_cache("latent_cache_BLR", latent_cache_BLR, C + kpe_TP.shape[1])
    if kpe_TP.shape[0] != T:
        raise ValueError(f"kpe_TP {tuple(kpe_TP.shape)} is invalid: must have the {T} rows of ckv_TC.")
    row_TR = quantize_for_cache(torch.cat([ckv_TC, kpe_TP], dim=1), latent_cache_BLR.dtype, kv_scale)
    # No host sync: padding rows write zeros into the null block (the cache's last block), which stays
    # all zeros as every reader expects.
    keep_T = slot_mapping_T >= 0
    null_slot = (latent_cache_BLR.shape[0] - 1) * latent_cache_BLR.shape[1]
    slot_mapping_T = torch.where(keep_T, slot_mapping_T, torch.full_like(slot_mapping_T, null_slot))
    row_TR = torch.where(keep_T[:, None], row_TR, torch.zeros((), dtype=row_TR.dtype, device=row_TR.device))
    if latent_cache_BLR.dtype in FP8_CACHE_DTYPES:  # torch has no fp8 index_copy_ on CPU: copy the bytes
        latent_cache_BLR, row_TR = latent_cache_BLR.view(torch.uint8), row_TR.view(torch.uint8)
    latent_cache_BLR.view(-1, latent_cache_BLR.shape[2]).index_copy_(0, slot_mapping_T, row_TR)


def reference_mla_attention(
    q_latent_TNC: torch.Tensor,
    q_pe_TNP: torch.Tensor,
    latent_cache_BLR: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scale: float = 1.0,
    *,
    sinks_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal absorbed MLA over the paged latent cache (see the module docstring for the algebra). sinks_N: a
    learned sink logit per head in every softmax's denominator (softmax_with_sinks), or None.

    q_latent_TNC [T, N, C]: queries already multiplied by W_UK; q_pe_TNP [T, N, P]: their roped part;
    latent_cache_BLR [B + 1, L, C + P]: this step's rows already written. The query at position
    p = seq_len - query_len + i sees cache rows [0, p]. Scores, softmax and P @ c_kv accumulate in float32
    (float64 for float64 inputs). An fp8 cache's rows count as stored * kv_scale. Returns out_latent_TNC
    [T, N, C] in q's dtype; the caller applies W_UV.
    Reads only the metadata's host lists and device tensors (no device→host sync).
    """
    check_mla_inputs(q_latent_TNC, q_pe_TNP, latent_cache_BLR)
    T, N, C = q_latent_TNC.shape
    check_sinks(sinks_N, N)
    acc = torch.promote_types(q_latent_TNC.dtype, torch.float32)
    # One [T, N, R] query against [X, R] rows: a single dot gives q_latent · c_kv + q_pe · k_pe.
    q_TNR = torch.cat([q_latent_TNC, q_pe_TNP], dim=2).to(acc)
    out_TNC = q_latent_TNC.new_empty(T, N, C)
    starts = list(itertools.accumulate(meta.query_lens, initial=0))
    decode_seqs = [s for s, n in enumerate(meta.query_lens) if n == 1]
    decode_seqs.sort(key=lambda s: meta.seq_lens[s])
    # Decodes in groups of similar length, so padding each group to its longest context wastes little.
    for i in range(0, len(decode_seqs), _DECODE_GROUP):
        _decode_group(q_TNR, latent_cache_BLR, meta, scale, decode_seqs[i : i + _DECODE_GROUP], starts, C, out_TNC,
                      kv_scale, sinks_N)
    for s, qlen in enumerate(meta.query_lens):
        if qlen <= 1:
            continue
        start, ctx = starts[s], meta.seq_lens[s]
        block_size = latent_cache_BLR.shape[1]
        blocks = meta.block_tables_SM[s, : -(-ctx // block_size)].long()
        rows_XR = latent_cache_BLR.index_select(0, blocks).flatten(0, 1)[:ctx].to(acc) * kv_scale
        scores_QNX = torch.einsum("qnr,xr->qnx", q_TNR[start : start + qlen], rows_XR) * scale
        key_pos_X = torch.arange(ctx, device=q_TNR.device)
        query_pos_Q = torch.arange(ctx - qlen, ctx, device=q_TNR.device)
        hidden_Q1X = (key_pos_X[None, :] > query_pos_Q[:, None])[:, None, :]
        probs_QNX = softmax_with_sinks(scores_QNX.masked_fill_(hidden_Q1X, float("-inf")), sinks_N)
        out_TNC[start : start + qlen] = torch.einsum("qnx,xc->qnc", probs_QNX, rows_XR[:, :C]).to(out_TNC.dtype)
    return out_TNC


_DECODE_GROUP = 32


def _decode_group(q_TNR, latent_cache_BLR, meta, scale, seqs, starts, C, out_TNC, kv_scale: float = 1.0,
                  sinks_N: torch.Tensor | None = None) -> None:
    block_size, R = latent_cache_BLR.shape[1:]
    S = len(seqs)
    tok_idx_S, slots_SX, valid_SX = decode_group_slots(meta, seqs, starts, block_size, q_TNR.device)
    max_ctx = slots_SX.shape[1]
    rows_SXR = latent_cache_BLR.view(-1, R).index_select(0, slots_SX.reshape(-1)).view(S, max_ctx, R).to(q_TNR.dtype) * kv_scale
    q_SNR = q_TNR.index_select(0, tok_idx_S)
    scores_SNX = torch.bmm(q_SNR, rows_SXR.transpose(1, 2)) * scale
    probs_SNX = softmax_with_sinks(scores_SNX.masked_fill_(~valid_SX[:, None, :], float("-inf")), sinks_N)
    out_TNC.index_copy_(0, tok_idx_S, torch.bmm(probs_SNX, rows_SXR[:, :, :C]).to(out_TNC.dtype))
