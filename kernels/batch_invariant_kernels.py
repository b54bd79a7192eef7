"""The batch-invariant backend's kernels (kernels/batch_invariant.py, rule 4): attention over fixed key blocks in
position order with an online softmax (GQA, absorbed MLA, DSA's selection and indexer), the experts always on their
per-expert path, the gated delta rule always in its recurrence. Each keeps its reference's contract
(kernels/attention.py, mla.py, dsa.py, moe.py, gated_delta.py), so the selector (kernels/ops.BatchInvariantKernels)
swaps them in under the references' names.

Legend: T tokens (query rows), N query heads, K KV heads, R = N / K, H head dim, Hv value head dim, B block size.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, dequantize_from_cache
from .batch_invariant import chunked_exp, fixed_bmm, tiled_amax, tiled_sum
from .gated_delta import gated_delta_rule_torch
from .moe import fused_moe_torch


def invariant_paged_attention(
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
    """`reference_paged_attention`'s contract (causal attention of each new token to its sequence's cached context,
    sinks, sliding window, fp8 cache scales), computed so that each query row's result depends on its own sequence
    only (module docstring, rule 2). Returns [T, N, Hv] in q's dtype.

    Every row walks the key blocks 0, 1, ... of its sequence (the cache's own blocks, B positions each) with an
    online softmax: per block, scores = q·k·scale masked to the row's causal (and window) range, m' = max(m,
    max scores), l' = l·e^(m-m') + Σ e^(s-m'), acc' = acc·e^(m-m') + e^(s-m')·v. Blocks past the row's range leave
    m, l and acc as they were, exactly. A sink starts m at the sink logit and l at 1 (its term of the denominator).
    Accumulates in float32 for half inputs, else in q's dtype. No host sync: the walk's length is the host's bound
    on the longest context, and each row's own length is read on the device."""
    # Its products have one shape per model already (M = R): run them as they are, not on BatchInvariantMode's tiles.
    with torch._C.DisableTorchFunction():
        return _invariant_attention(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N, sliding_window, k_scale,
                                    v_scale)


def row_positions(meta: AttentionMetadata, T: int, dev: torch.device):
    """(seq_T, ctx_T, pos_T): each row's sequence, its sequence's length after this step, the row's own position
    (device work; the host lists give the lengths' layout, not their values)."""
    seq_T = torch.repeat_interleave(torch.arange(len(meta.query_lens), device=dev),
                                    torch.tensor(meta.query_lens, device=dev), output_size=T)
    qlen_T = torch.tensor(meta.query_lens, device=dev).index_select(0, seq_T)
    first_T = (meta.query_start_loc_S1[:-1].long()).index_select(0, seq_T)
    ctx_T = meta.seq_lens_S.long().index_select(0, seq_T)
    return seq_T, ctx_T, ctx_T - qlen_T + (torch.arange(T, device=dev) - first_T)


def _invariant_attention(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N, sliding_window, k_scale,
                         v_scale, acc_floor: torch.dtype | None = None) -> torch.Tensor:
    """The dense walk: block j of every row is its positions [j B, (j + 1) B), masked to the row's causal (and
    window) range."""
    T = q_TNH.shape[0]
    block_size = k_cache_BLKH.shape[1]
    dev = q_TNH.device
    seq_T, ctx_T, pos_T = row_positions(meta, T, dev)
    lo_T = torch.zeros_like(pos_T) if sliding_window is None else pos_T - sliding_window + 1
    tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
    offs_B = torch.arange(block_size, device=dev)
    num_blocks = min(-(-max(meta.seq_lens) // block_size), tables_TM.shape[1])

    def blocks():
        for j in range(num_blocks):
            kpos_TB = j * block_size + offs_B[None, :]
            readable_TB = kpos_TB < ctx_T[:, None]  # written positions; others read the null block (zeros)
            slots_TB = torch.where(readable_TB, tables_TM[:, j:j + 1] * block_size + offs_B[None, :],
                                   meta.null_block * block_size)
            yield slots_TB, (kpos_TB <= pos_T[:, None]) & (kpos_TB >= lo_T[:, None])
    return walk_blocks(q_TNH, k_cache_BLKH, v_cache_BLKH, blocks(), scale, sinks_N, k_scale, v_scale, acc_floor)


# Key slots (rows x blocks x block size) one group of the walk gathers at most: the blocks of a group run their
# products, maxima, exponentials and sums as one batch each (a bounded copy of the keys, not the whole context).
WALK_GROUP_SLOTS = 1 << 15


def walk_blocks(q_TNH, k_cache_BLKH, v_cache_BLKH, blocks, scale, sinks_N, k_scale, v_scale,
                acc_floor: torch.dtype | None) -> torch.Tensor:
    """The online softmax over `blocks`: (slots_TB, seen_TB) per step, B key slots per row and which of them the
    row sees, [T, B] or per head [T, N, B] (the others count -inf: an exact no-op). Shared by every attention of the backend (GQA, MLA, DSA here;
    compressed attention in kernels/batch_invariant_compressed.py).

    The blocks run in groups of G (up to WALK_GROUP_SLOTS key slots), each step of the walk batched across the
    group with the bits of a block-at-a-time walk: a block's products are matrices of the same shape in a larger
    batch (fixed_bmm: a matrix's result does not depend on the batch count), its maximum over the keys is a running
    maximum (cummax: exact), the exponentials are chunked element-wise ops and the sums row-tiled ones (an element's
    or a row's result is its own); only the recurrences l' = l·α + Σp and acc' = acc·α + p·v run block by block."""
    T, N, H = q_TNH.shape
    block_size, num_kv, _ = k_cache_BLKH.shape[1:]
    hv = v_cache_BLKH.shape[-1]
    rep = N // num_kv
    dev = q_TNH.device
    acc_dtype = torch.float32 if q_TNH.dtype.itemsize < 4 else q_TNH.dtype
    if acc_floor is not None:
        acc_dtype = torch.promote_types(acc_dtype, acc_floor)
    q_XRH = q_TNH.to(acc_dtype).reshape(T * num_kv, rep, H)
    if sinks_N is None:
        m_TN = torch.full((T, N), float("-inf"), dtype=acc_dtype, device=dev)
        l_TN = torch.zeros((T, N), dtype=acc_dtype, device=dev)
    else:
        m_TN = sinks_N.to(acc_dtype)[None, :].expand(T, N).clone()
        l_TN = torch.ones((T, N), dtype=acc_dtype, device=dev)
    acc_TNV = torch.zeros((T, N, hv), dtype=acc_dtype, device=dev)
    k_flat = k_cache_BLKH.flatten(0, 1)
    v_flat = v_cache_BLKH.flatten(0, 1)
    it = iter(blocks)
    while True:
        first = next(it, None)
        if first is None:
            break
        group = [first]
        per_group = max(1, WALK_GROUP_SLOTS // max(1, T * first[0].shape[1]))
        group.extend(itertools.islice(it, per_group - 1))
        G = len(group)
        slots_GTB = torch.stack([slots for slots, _ in group])
        seen = torch.stack([seen for _, seen in group])  # [G, T, B] or [G, T, N, B]
        B = slots_GTB.shape[-1]
        idx = slots_GTB.reshape(-1)
        k_GTBKH = dequantize_from_cache(k_flat.index_select(0, idx), acc_dtype, k_scale).to(acc_dtype).view(
            G, T, B, num_kv, -1)
        v_GTBKV = dequantize_from_cache(v_flat.index_select(0, idx), acc_dtype, v_scale).to(acc_dtype).view(
            G, T, B, num_kv, hv)
        # Contiguous operands: a batched matmul's kernel may depend on its operands' strides.
        k_YHB = k_GTBKH.permute(0, 1, 3, 4, 2).reshape(G * T * num_kv, -1, B).contiguous()
        v_YBV = v_GTBKV.permute(0, 1, 3, 2, 4).reshape(G * T * num_kv, B, hv).contiguous()
        q_YRH = q_XRH[None].expand(G, -1, -1, -1).reshape(G * T * num_kv, rep, H)
        s_GTNB = (fixed_bmm(q_YRH, k_YHB) * scale).view(G, T, N, B)
        # seen per row [G, T, B], or per row and head [G, T, N, B] (block-sparse attention selects per head)
        s_GTNB = s_GTNB.masked_fill(~(seen[:, :, None, :] if seen.dim() == 3 else seen), float("-inf"))
        # m after each block of the group: the running maximum from the group's m (max is exact in any order)
        m_all = torch.cat([m_TN[None], tiled_amax(s_GTNB, -1)]).cummax(dim=0).values
        m_new_GTN = m_all[1:]
        # A row that has seen no key yet (m' = -inf: a window not reached) subtracts 0, not -inf (no NaN).
        shift_GTN = torch.where(torch.isinf(m_new_GTN), torch.zeros_like(m_new_GTN), m_new_GTN)
        p_GTNB = chunked_exp(s_GTNB - shift_GTN[..., None])
        alpha_GTN = chunked_exp(m_all[:-1] - shift_GTN)
        sum_GTN = tiled_sum(p_GTNB, -1)
        pv_GTNV = fixed_bmm(p_GTNB.view(G * T * num_kv, rep, B), v_YBV).view(G, T, N, hv)
        for g in range(G):
            l_TN = l_TN * alpha_GTN[g] + sum_GTN[g]
            acc_TNV = acc_TNV * alpha_GTN[g][..., None] + pv_GTNV[g]
        m_TN = m_all[-1]
    return (acc_TNV / l_TN[..., None]).to(q_TNH.dtype)


def invariant_mla_attention(
    q_latent_TNC: torch.Tensor,
    q_pe_TNP: torch.Tensor,
    latent_cache_BLR: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scale: float = 1.0,
    *,
    sinks_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference_mla_attention`'s contract (causal absorbed MLA over the paged latent cache, kernels/mla.py), as the
    same block walk: absorbed MLA is attention with one KV head whose key is the cache row [c_kv | k_pe] (R = C + P)
    and whose value is its c_kv part, queried by [q_latent | q_pe]. Returns out_latent_TNC [T, N, C] in q's dtype;
    accumulates in float32 (float64 for float64 inputs), as the reference."""
    C = q_latent_TNC.shape[-1]
    with torch._C.DisableTorchFunction():
        q_TNR = torch.cat([q_latent_TNC, q_pe_TNP], dim=2)
        rows_BL1R = latent_cache_BLR.unsqueeze(2)
        out_TNC = _invariant_attention(q_TNR, rows_BL1R, rows_BL1R[..., :C], meta, scale, sinks_N, None, kv_scale,
                                       kv_scale, acc_floor=torch.float32)
        return out_TNC.to(q_latent_TNC.dtype)


def invariant_sparse_mla_attention(q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                                   meta: AttentionMetadata, topk_TK: torch.Tensor, scale: float, kv_scale: float = 1.0,
                                   *, sinks_N: torch.Tensor | None = None) -> torch.Tensor:
    """`reference_sparse_mla_attention`'s contract (DSA: each token attends to its selected positions topk_TK[t],
    ascending, -1 padding), as the block walk over the selection in chunks of the cache's block size. A row that
    selected all its positions (it sees at most index_topk) walks exactly the dense walk's blocks, so a step that
    runs dense MLA (every row sees at most index_topk: engine/models/dsa.py) and one that runs this give such a row
    the same bits."""
    C = q_latent_TNC.shape[-1]
    T = q_latent_TNC.shape[0]
    with torch._C.DisableTorchFunction():
        q_TNR = torch.cat([q_latent_TNC, q_pe_TNP], dim=2)
        rows_BL1R = latent_cache_BLR.unsqueeze(2)
        block_size = latent_cache_BLR.shape[1]
        dev = q_TNR.device
        seq_T, _, _ = row_positions(meta, T, dev)
        tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
        K = topk_TK.shape[1]
        pos_TK = F.pad(topk_TK.long(), (0, -K % block_size), value=-1)

        def blocks():
            for c in range(0, pos_TK.shape[1], block_size):
                p_TB = pos_TK[:, c:c + block_size]
                valid_TB = p_TB >= 0
                q_TB = p_TB.clamp(min=0)
                slots_TB = torch.where(valid_TB, tables_TM.gather(1, q_TB // block_size) * block_size + q_TB % block_size,
                                       meta.null_block * block_size)
                yield slots_TB, valid_TB
        out_TNC = walk_blocks(q_TNR, rows_BL1R, rows_BL1R[..., :C], blocks(), scale, sinks_N, kv_scale, kv_scale,
                        torch.float32)
        return out_TNC.to(q_latent_TNC.dtype)


def invariant_dsa_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                       meta: AttentionMetadata, topk: int, scale: float, max_len: int | None = None) -> torch.Tensor:
    """`reference_dsa_topk`'s selection with each row's index scores computed alone: per block of B positions, the
    H x D by D x B product of the row's index queries and keys, relu, then the 1 x H by H x B product with its head
    weights (one shape per model; the reference's einsum over a width padded to the step's longest row sums per
    shape). The top-k keeps the reference's rule: the highest scores, ties to the lowest positions, ascending."""
    from .dsa import causal_lens, is_fp8_index_cache, reference_topk_positions

    if is_fp8_index_cache(index_cache_BLD):
        raise ValueError("batch_invariant=True does not run an fp8 index cache yet: serve index_cache_dtype='auto'.")
    T, H, D = q_THD.shape
    with torch._C.DisableTorchFunction():
        dev = q_THD.device
        width = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
        n_T = causal_lens(meta, dev)
        seq_T, _, _ = row_positions(meta, T, dev)
        tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
        B = index_cache_BLD.shape[1]
        keys = index_cache_BLD.view(-1, index_cache_BLD.shape[-1])
        q_THD32 = q_THD.float().contiguous()
        w_T1H = weights_TH.float().view(T, 1, H).contiguous()
        scores_TW = torch.full((T, -(-width // B) * B), float("-inf"), dtype=torch.float32, device=dev)
        offs_B = torch.arange(B, device=dev)
        for j in range(-(-width // B)):
            kpos_TB = j * B + offs_B[None, :]
            visible_TB = kpos_TB < n_T[:, None]
            slots_TB = torch.where(visible_TB, tables_TM[:, min(j, tables_TM.shape[1] - 1)][:, None] * B + offs_B,
                                   meta.null_block * B)
            k_TDB = keys.index_select(0, slots_TB.reshape(-1))[:, :D].float().view(T, B, D).transpose(1, 2).contiguous()
            s_THB = torch.relu(fixed_bmm(q_THD32, k_TDB) * scale)
            score_TB = fixed_bmm(w_T1H, s_THB)[:, 0] + 0.0  # + 0.0: -0.0 counts as 0.0
            scores_TW[:, j * B:(j + 1) * B] = torch.where(visible_TB, score_TB, float("-inf"))
        return reference_topk_positions(scores_TW[:, :width], n_T, topk)


def invariant_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                        topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                        expert_map_G: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    """`reference_fused_moe` on its per-expert path always: the reference switches to a padded batched matmul for
    small batches, which rounds otherwise, so a token's expert output would depend on the batch's size. Each
    expert's rows then run on BatchInvariantMode's tiles, and a token sums its experts' outputs in expert order."""
    return fused_moe_torch(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G, padded_max_pairs=0,
                           **kw)


def invariant_gated_delta_rule(q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor,
                               beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor,
                               slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """`reference_gated_delta_rule` always in the per-token recurrence (the reference switches long sequences to the
    chunked WY form, which sums otherwise): a prefilled token's output and state are then what its decode step
    computes, and a prefill chunked anywhere continues its state exactly."""
    return gated_delta_rule_torch(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                  slot_ids_S, has_initial_state_S, scale, chunked=False)


@functools.lru_cache(maxsize=None)
def supported_attention_kinds() -> frozenset[str]:
    """The attention kinds whose reference path goes through `paged_attention` (GQA, with sinks and sliding windows)
    or `mla_attention` (dense MLA) alone: the kinds a batch-invariant engine serves. The others (DSA's sparse MLA,
    linear attention, compressed, block-sparse, QSA) reduce in their own kernels and are refused by name until each
    has its invariant form."""
    return frozenset({"gqa", "mla", "linear", "kda", "dsa", "compressed", "block_sparse", "pooled_dsa", "qsa"})


__all__ = ["row_positions", "walk_blocks", "invariant_dsa_topk", "invariant_fused_moe", "invariant_gated_delta_rule", "invariant_mla_attention",
           "invariant_paged_attention", "invariant_sparse_mla_attention", "supported_attention_kinds"]
