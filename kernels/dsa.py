"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the lightning indexer's selection and MLA over the selected
positions. Plain-torch references (the contract, the test oracle and the CPU path); triton_dsa_topk.py and
triton_mla_sparse.py are the Triton kernels.

Legend: T query tokens in the flat batch, S sequences, H index heads, D index head dim, K top-k, W score width (at
least every query's causal length), X context, L block size, and N, C, P, R as in mla.py.

The indexer's key cache sits beside the latent cache on the same block ids: token p of a sequence has its key row at
slot `block_table[p // L] * L + p % L`, in one of two layouts (engine/models/dsa_config.py chooses):
- float, index_cache_BLD [B + 1, L, D] in a float dtype (written like a latent row, `write_latent`; an e4m3 tensor of
  this shape is read as key / 1.0);
- fp8 with scales, index_cache_BLX uint8 [B + 1, L, X], X = fp8_key_row_bytes(D): the key in e4m3 (D bytes, padded to
  4), then one float32 scale per SCALE_GROUP (128) values, amax / 448 (`quantize_index_keys`,
  `reference_write_fp8_index_keys`; Triton: triton_dsa_keys.py).
  A key group g reads as e4m3 * scale[g]; the scores apply the scale to each group's dot product, as the kernel does:
      q . k = sum_g scale[g] * (q[group g] . k_e4m3[group g])

Selection (transformers' DeepseekV32Indexer without a cache): query token t at position p (= seq_len - query_len + i)
scores every position j <= p,
    score[t, j] = sum_h weights[t, h] * relu(scale * q[t, h] . k[j])
in float32 (transformers casts q and k to float32), and keeps the K positions of highest score, or all p + 1 of them
when p + 1 <= K. Ties at the boundary keep the lowest positions (a stable descending sort; the Triton kernel counts
the same way); -0.0 counts as 0.0. Output: topk_TK int32, the selected positions first (ascending here; any order
in the Triton kernel), then -1.

Sparse attention: MLA's absorbed attention (mla.py's algebra) where query t's softmax runs over its selected rows
only. With every causal position selected it is mla.py's dense attention: the dense path serves steps whose queries
all fit in K, and both give the same tokens.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .mla import check_mla_inputs, check_sinks, softmax_with_sinks

# Query rows per gathered chunk of the references (bounds their [rows, K or X, ...] temporaries).
_ROWS = 256
# The fp8 key layout (engine/models/dsa_config.py has the same numbers: tests/kernels/test_dsa.py holds them
# equal, as kernels import nothing of the engine).
SCALE_GROUP = 128
FP8_KEY_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def fp8_key_groups(D: int) -> int:
    """Scales per fp8 key: one per SCALE_GROUP values, the last group possibly shorter."""
    return -(-D // SCALE_GROUP)


def fp8_key_row_bytes(D: int) -> int:
    """Bytes of one token's fp8 key row: D e4m3 bytes padded to 4, then fp8_key_groups(D) float32 scales."""
    return _scale_offset(D) + 4 * fp8_key_groups(D)


def _scale_offset(D: int) -> int:
    return -(-D // 4) * 4


def is_fp8_index_cache(index_cache: torch.Tensor) -> bool:
    """Whether a key cache holds fp8 keys with scales (uint8 rows), not float keys."""
    return index_cache.dtype == torch.uint8


def fp8_index_views(index_cache_BLX: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp8 key cache's keys, e4m3 [B + 1, L, X] (the first D of each row are the key), and scales, float32
    [B + 1, L, groups]: views of the same memory."""
    g0 = _scale_offset(D) // 4
    return (index_cache_BLX.view(FP8_KEY_DTYPE),
            index_cache_BLX.view(torch.float32)[..., g0: g0 + fp8_key_groups(D)])


def check_index_inputs(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor) -> None:
    """The shape checks shared by the reference and the Triton wrapper."""
    if q_THD.dim() != 3 or weights_TH.shape != q_THD.shape[:2]:
        raise ValueError(f"q_THD {tuple(q_THD.shape)} and weights_TH {tuple(weights_TH.shape)} are invalid: must be "
                         "[T, index heads, index head dim] and [T, index heads].")
    D = q_THD.shape[2]
    width = fp8_key_row_bytes(D) if is_fp8_index_cache(index_cache_BLD) else D
    if index_cache_BLD.dim() != 3 or index_cache_BLD.shape[2] != width or not index_cache_BLD.is_contiguous():
        raise ValueError(f"index_cache_BLD {tuple(index_cache_BLD.shape)} {index_cache_BLD.dtype} is invalid: must be "
                         f"a contiguous [blocks, block_size, {width}] tensor (one indexer key row per token: {D} float "
                         f"values, or as uint8 {fp8_key_row_bytes(D)} bytes of fp8 key and scales).")


def quantize_index_keys(k_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [T, D] -> (e4m3 [T, D], float32 scales [T, groups]): per group of SCALE_GROUP values, scale = amax / 448
    and key / scale rounded to e4m3 (an all-zero group: scale 0, key 0)."""
    T, D = k_TD.shape
    G = fp8_key_groups(D)
    k_TGS = torch.nn.functional.pad(k_TD.to(torch.float32), (0, G * SCALE_GROUP - D)).view(T, G, SCALE_GROUP)
    scale_TG = k_TGS.abs().amax(dim=2) / _FP8_MAX
    q_TGS = (k_TGS / torch.where(scale_TG > 0, scale_TG, 1.0)[..., None]).clamp(-_FP8_MAX, _FP8_MAX)
    return q_TGS.view(T, G * SCALE_GROUP)[:, :D].to(FP8_KEY_DTYPE), scale_TG


def check_fp8_index_write(k_TD: torch.Tensor, index_cache_BLX: torch.Tensor) -> None:
    """The checks shared by the fp8 key writes (reference and Triton)."""
    X = fp8_key_row_bytes(k_TD.shape[1]) if k_TD.dim() == 2 else None
    if (X is None or not is_fp8_index_cache(index_cache_BLX) or index_cache_BLX.dim() != 3
            or index_cache_BLX.shape[2] != X or not index_cache_BLX.is_contiguous()):
        raise ValueError(f"k_TD {tuple(k_TD.shape)} and index_cache_BLX {tuple(index_cache_BLX.shape)} "
                         f"{index_cache_BLX.dtype} are invalid: must be [T, D] keys and a contiguous uint8 [blocks, "
                         f"block_size, fp8_key_row_bytes(D)] cache (fp8 keys and their scales).")


def reference_write_fp8_index_keys(k_TD: torch.Tensor, index_cache_BLX: torch.Tensor,
                                   slot_mapping_T: torch.Tensor) -> None:
    """Quantize this step's keys (quantize_index_keys) and scatter their rows into an fp8 key cache (in place). Plain
    torch on every device (a few elementwise launches over T x D values); slots < 0 are padding tokens, whose rows
    write zeros into the null block (the last), as write_latent does. No host sync."""
    check_fp8_index_write(k_TD, index_cache_BLX)
    T, D = k_TD.shape
    X = fp8_key_row_bytes(D)
    k8_TD, scale_TG = quantize_index_keys(k_TD)
    row_TX = torch.zeros(T, X, dtype=torch.uint8, device=k_TD.device)
    row_TX[:, :D] = k8_TD.view(torch.uint8)
    row_TX[:, _scale_offset(D):] = scale_TG.view(torch.uint8)
    keep_T = slot_mapping_T >= 0
    null_slot = (index_cache_BLX.shape[0] - 1) * index_cache_BLX.shape[1]
    slots_T = torch.where(keep_T, slot_mapping_T, torch.full_like(slot_mapping_T, null_slot))
    row_TX = torch.where(keep_T[:, None], row_TX, torch.zeros((), dtype=torch.uint8, device=row_TX.device))
    index_cache_BLX.view(-1, X).index_copy_(0, slots_T.long(), row_TX)


def causal_lens(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """int64 [T]: how many positions each query token sees (its position + 1), from the device lengths (a decode row's
    host length may be only a bound: AttentionMetadata). No host sync."""
    qlen_S = torch.tensor(meta.query_lens, device=device, dtype=torch.long)
    seq_T = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlen_S)
    start_T = meta.query_start_loc_S1[:-1].long().index_select(0, seq_T)
    i_T = torch.arange(seq_T.numel(), device=device) - start_T
    return meta.seq_lens_S.long().index_select(0, seq_T) - qlen_S.index_select(0, seq_T) + i_T + 1


def reference_dsa_index_scores(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                               meta: AttentionMetadata, scale: float, width: int | None = None) -> torch.Tensor:
    """float32 [T, W] index scores (module docstring), -inf at positions a query does not see. W = `width`, or the
    host max_seq_len (a bound of every device length). Reads the host lists and device tensors only."""
    check_index_inputs(q_THD, weights_TH, index_cache_BLD)
    T, _, D = q_THD.shape
    W = meta.max_seq_len if width is None else width
    dev = q_THD.device
    n_T = causal_lens(meta, dev)
    pos_W = torch.arange(W, device=dev)
    out_TW = torch.full((T, W), float("-inf"), dtype=torch.float32, device=dev)
    L, X = index_cache_BLD.shape[1:]
    keys = index_cache_BLD.view(-1, X)
    fp8 = is_fp8_index_cache(index_cache_BLD)
    qf_THD = q_THD.float()  # transformers casts q and k to float32
    for t0 in range(0, T, _ROWS):
        rows = slice(t0, min(T, t0 + _ROWS))
        visible_TW = pos_W[None, :] < n_T[rows, None]
        slots_TW = _slots_rows(meta, rows, pos_W, visible_TW, L)
        k_TWX = keys.index_select(0, slots_TW.reshape(-1)).view(*slots_TW.shape, X)
        if fp8:  # each group's dot product times its scale (module docstring), as the kernel computes it
            k8_TWD, scale_TWG = fp8_index_views(k_TWX, D)
            k8_TWD = k8_TWD[..., :D].float()
            dots_THW = sum(torch.einsum("thd,twd->thw", qf_THD[rows, :, g: g + SCALE_GROUP],
                                        k8_TWD[..., g: g + SCALE_GROUP]) * scale_TWG[:, None, :, g // SCALE_GROUP]
                           for g in range(0, D, SCALE_GROUP))
        else:  # an e4m3 tensor of keys: stored at scale 1.0
            dots_THW = torch.einsum("thd,twd->thw", qf_THD[rows], k_TWX.float())
        s_THW = torch.relu(dots_THW * scale)
        score_TW = torch.einsum("th,thw->tw", weights_TH[rows].float(), s_THW)
        out_TW[rows] = torch.where(visible_TW, score_TW + 0.0, float("-inf"))  # + 0.0: -0.0 counts as 0.0
    return out_TW


def _slots_rows(meta: AttentionMetadata, rows: slice, pos_W: torch.Tensor, visible_TW: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """Flat slots [rows, W] of positions pos_W for the query tokens `rows`; invisible ones point at position 0 (any
    written slot: their scores are dropped)."""
    qlen_S = torch.tensor(meta.query_lens, device=pos_W.device, dtype=torch.long)
    seq_T = torch.repeat_interleave(torch.arange(meta.num_seqs, device=pos_W.device), qlen_S)[rows]
    tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
    pos_TW = torch.where(visible_TW, pos_W[None, :], 0)
    return tables_TM.gather(1, pos_TW // block_size) * block_size + pos_TW % block_size


def reference_topk_positions(scores_TW: torch.Tensor, n_T: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 [T, topk]: each row's `topk` highest-scoring positions among its first n_T (all of them when n_T <= topk),
    ties to the lowest positions, ascending, then -1."""
    T, W = scores_TW.shape
    pos_W = torch.arange(W, device=scores_TW.device)
    visible_TW = pos_W[None, :] < n_T[:, None]
    masked = torch.where(visible_TW, scores_TW, float("-inf"))
    order_TW = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :topk]
    keep_TK = torch.arange(order_TW.shape[1], device=scores_TW.device)[None, :] < n_T[:, None]
    big = torch.iinfo(torch.int64).max
    picked = torch.sort(torch.where(keep_TK, order_TW, big), dim=1).values
    out_TK = torch.full((T, topk), -1, dtype=torch.int32, device=scores_TW.device)
    out_TK[:, : picked.shape[1]] = torch.where(picked == big, -1, picked).to(torch.int32)
    return out_TK


def reference_dsa_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                       meta: AttentionMetadata, topk: int, scale: float, max_len: int | None = None) -> torch.Tensor:
    """The indexer's selection (module docstring): int32 [T, topk] positions per query token, -1 past its count.
    q_THD [T, H, D] (roped index queries), weights_TH [T, H] (weights_proj(x) / sqrt(H), float32), index_cache_BLD with
    this step's keys written. `max_len`: a bound of every sequence's length the caller guarantees (max_model_len),
    what a kernel sizes its scores by where host lengths are placeholders (a decode graph's); the reference, never
    captured, scores min(host max_seq_len, max_len) positions. No device->host sync."""
    width = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
    scores_TW = reference_dsa_index_scores(q_THD, weights_TH, index_cache_BLD, meta, scale, width)
    return reference_topk_positions(scores_TW, causal_lens(meta, q_THD.device), topk)


pool_slots = _slots_rows  # the batch-invariant pooled selection gathers the same way


def reference_dsa_pool_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLX: torch.Tensor,
                            ape_PD: torch.Tensor, meta: AttentionMetadata, topk: int, scale: float,
                            max_len: int | None = None) -> torch.Tensor:
    """GLM-5.3-Flash's pooled selection (engine/models/dsa_config.py; transformers' Glm5NextTextIndexer without
    a cache is the definition): int32 [T, topk + kpool - 1] positions per query token, -1 where none.

    index_cache_BLX rows are [key (D) | gate (D)] (X = 2 D); kpool = ape_PD.shape[0]. Pool p holds positions
    [p kpool, (p + 1) kpool); its key is sum_j softmax_j(gate[j] + ape[j - p kpool]) * key[j], per channel (the
    softmax in float32, its weights cast to the keys' dtype, as transformers). A query that sees n positions scores
    the n // kpool complete pools: sum_h w[h] * relu(q[h] . pool_key * scale) in float32; it takes the topk // kpool
    best (all when fewer; ties to the lower pool), their positions ascending, then its incomplete pool's n % kpool
    positions. `max_len` as reference_dsa_topk's."""
    T, H, D = q_THD.shape
    kp, P, n_T = pool_shape(q_THD, weights_TH, index_cache_BLX, ape_PD, meta, max_len)
    dev = q_THD.device
    L, X = index_cache_BLX.shape[1:]
    rows_all = index_cache_BLX.view(-1, X)
    pos_W = torch.arange(P * kp, device=dev)
    K = topk // kp
    out_TK = torch.full((T, topk + kp - 1), -1, dtype=torch.int32, device=dev)
    for t0 in range(0, T, _ROWS):
        rows = slice(t0, min(T, t0 + _ROWS))
        n_R = n_T[rows]
        visible_RW = pos_W[None, :] < n_R[:, None]
        slots_RW = _slots_rows(meta, rows, pos_W, visible_RW, L)
        r_RWX = rows_all.index_select(0, slots_RW.reshape(-1)).view(*slots_RW.shape, X)
        pool_RPD = pool_keys(r_RWX, ape_PD, P)
        dots_RHP = torch.einsum("rhd,rpd->rhp", q_THD[rows].float(), pool_RPD.float())
        score_RP = torch.einsum("rh,rhp->rp", weights_TH[rows].float(), torch.relu(dots_RHP * scale)) + 0.0
        pools_RK = reference_topk_positions(score_RP, n_R // kp, K).long()  # pool ids ascending, -1 past the count
        out_TK[rows] = pool_positions(pools_RK, n_R, kp)
    return out_TK


def pool_shape(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLX: torch.Tensor, ape_PD: torch.Tensor,
               meta: AttentionMetadata, max_len: int | None) -> tuple[int, int, torch.Tensor]:
    """The pooled selection's inputs checked (ValueError naming the shapes), and (kpool, P the pools scored, n_T each
    token's visible positions)."""
    T, H, D = q_THD.shape
    kp = ape_PD.shape[0]
    if index_cache_BLX.shape[-1] != 2 * D or weights_TH.shape != (T, H) or ape_PD.shape != (kp, D):
        raise ValueError(f"dsa_pool_topk: q {tuple(q_THD.shape)}, weights {tuple(weights_TH.shape)}, cache rows "
                         f"{index_cache_BLX.shape[-1]}, ape {tuple(ape_PD.shape)}: want [T, H, D], [T, H], 2 D, [kpool, D].")
    W = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
    return kp, max(W // kp, 1), causal_lens(meta, q_THD.device)


def pool_keys(r_RWX: torch.Tensor, ape_PD: torch.Tensor, P: int) -> torch.Tensor:
    """[R, P, D]: each pool's key from its rows [key | gate] (the softmax over the pool's positions in float32, its
    weights cast to the keys' dtype, as transformers)."""
    kp, D = ape_PD.shape
    key_RPkD = r_RWX[..., :D].reshape(-1, P, kp, D)
    gate_RPkD = r_RWX[..., D:].reshape(-1, P, kp, D)
    probs = torch.softmax(gate_RPkD.float() + ape_PD.float()[None, None], dim=2).to(key_RPkD.dtype)
    return (probs * key_RPkD).sum(dim=2)


def pool_positions(pools_RK: torch.Tensor, n_R: torch.Tensor, kp: int) -> torch.Tensor:
    """int32 [R, K kpool + kpool - 1]: the chosen pools' positions (pool ids ascending, -1 past the count), then the
    incomplete pool's n % kpool positions."""
    dev = pools_RK.device
    tok_RKk = torch.where(pools_RK[..., None] >= 0, pools_RK[..., None] * kp + torch.arange(kp, device=dev), -1)
    tail = torch.arange(kp - 1, device=dev)
    tail_Rt = torch.where(tail[None, :] < (n_R % kp)[:, None], (n_R - n_R % kp)[:, None] + tail[None, :], -1)
    return torch.cat([tok_RKk.reshape(tok_RKk.shape[0], -1), tail_Rt], dim=1).to(torch.int32)


def reference_sparse_mla_attention(q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                                   meta: AttentionMetadata, topk_TK: torch.Tensor, scale: float,
                                   kv_scale: float = 1.0, *, sinks_N: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA (mla.reference_mla_attention's contract, sinks_N too) where token t attends to the rows of its
    selected positions topk_TK[t] (>= 0; -1 entries are padding) only. Returns out_latent_TNC [T, N, C] in q's dtype; scores,
    softmax and P @ c_kv in float32 (float64 for float64 inputs); an fp8 cache's rows count as stored * kv_scale."""
    check_mla_inputs(q_latent_TNC, q_pe_TNP, latent_cache_BLR)
    T, N, C = q_latent_TNC.shape
    check_sinks(sinks_N, N)
    if topk_TK.dim() != 2 or topk_TK.shape[0] != T:
        raise ValueError(f"topk_TK {tuple(topk_TK.shape)} is invalid: must be [{T}, index_topk] positions.")
    acc = torch.promote_types(q_latent_TNC.dtype, torch.float32)
    q_TNR = torch.cat([q_latent_TNC, q_pe_TNP], dim=2).to(acc)
    out_TNC = q_latent_TNC.new_empty(T, N, C)
    L, R = latent_cache_BLR.shape[1:]
    rows_all = latent_cache_BLR.view(-1, R)
    qlen_S = torch.tensor(meta.query_lens, device=q_TNR.device, dtype=torch.long)
    seq_T = torch.repeat_interleave(torch.arange(meta.num_seqs, device=q_TNR.device), qlen_S)
    for t0 in range(0, T, _ROWS):
        rows = slice(t0, min(T, t0 + _ROWS))
        pos_TK = topk_TK[rows].long()
        valid_TK = pos_TK >= 0
        pos_TK = pos_TK.clamp(min=0)
        tables_TM = meta.block_tables_SM.long().index_select(0, seq_T[rows])
        slots_TK = tables_TM.gather(1, pos_TK // L) * L + pos_TK % L
        kv_TKR = rows_all.index_select(0, slots_TK.reshape(-1)).view(*slots_TK.shape, R).to(acc) * kv_scale
        s_TNK = torch.einsum("tnr,tkr->tnk", q_TNR[rows], kv_TKR) * scale
        p_TNK = softmax_with_sinks(s_TNK.masked_fill(~valid_TK[:, None, :], float("-inf")), sinks_N)
        out_TNC[rows] = torch.einsum("tnk,tkc->tnc", p_TNK, kv_TKR[..., :C]).to(out_TNC.dtype)
    return out_TNC


__all__ = ["FP8_KEY_DTYPE", "SCALE_GROUP", "causal_lens", "check_index_inputs", "reference_dsa_pool_topk", "fp8_index_views", "fp8_key_groups",
           "fp8_key_row_bytes", "check_fp8_index_write", "is_fp8_index_cache", "quantize_index_keys",
           "reference_dsa_index_scores",
           "reference_dsa_topk", "reference_sparse_mla_attention", "reference_topk_positions",
           "reference_write_fp8_index_keys", "pool_keys", "pool_positions", "pool_shape",
           "pool_slots"]
