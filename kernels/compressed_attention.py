"""Compressed-KV attention in plain torch (issue 45: DeepSeek-V4's CSA / HCA layers, the first to run it): the
references the Triton kernels (triton_compressed_attention*.py, triton_compressed_topk.py) replace behind
kernels/ops.py, and what the engine's reference path runs now: the compressor's pooling of windows into entries, the
lightning indexer's top-k over entries, MQA with per-head sinks over a sliding window and the picked entries, the
grouped output projection.

Numerics follow transformers' deepseek_v4 op for op where it leaves the activations' dtype: the rotary's rope slice
is rounded to float32 before it is rotated, the lightning indexer scores in float32, norms compute in float32 with
float32 weights. Everything else stays in the activations' dtype (float64 in the parity tests).

A batched decode step's two ops read the cache where it lies (`reference_paged_indexer_topk`,
`reference_paged_sink_attention`): index keys and entries in their pages through each query's block table, window rows
in its state slot. These references gather them first (the oracle); triton_compressed_attention_paged.py reads them in
place.

An fp8 KV cache (--kv-cache-dtype fp8) keeps each paged row as bytes (`FP8Rows`, uint8 pages [B, Lc, X]), the layout
of DeepSeek's own fp8 sparse KV (FlashMLA's): an entry's leading H - R values in e4m3 with one float32 scale per 64
of them (amax / 448), its R rope values in bfloat16 (the rotated dims keep their precision, as DeepSeek's do); an
index key all e4m3 with a float32 scale per 128 values (one per row at V4's I = 128), DSA's key row byte for byte
(kernels/dsa.py). Writers quantize (`FP8Rows.encode`), readers dequantize as they read (`FP8Rows.decode` here, the
same arithmetic inside the Triton kernels: e4m3 * scale in float32, then the activations' dtype).

Legend: T queries, N heads, H head_dim, R rotary dims (the trailing R of a head), h = R / 2, S keys, n windows,
m compress rate, C a compressor row (kv | gate), E compressed entries, n_I indexer heads, I index_head_dim, G output
groups; paged: B blocks, Lc entries per block, M block-table width, P state slots, W window, K picks.
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from .dsa import reference_topk_positions

_FP8_MAX = 448.0
ENTRY_SCALE_GROUP = 64  # an entry's values per scale (DeepSeek's V4 fp8 KV: 7 scales over 448 e4m3 values)
INDEX_SCALE_GROUP = 128  # an index key's (DSA's)


def _up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass(frozen=True)
class FP8Rows:
    """One fp8 cache row's byte layout: the leading `dim - rope` values e4m3 (padded to 4 bytes), then one float32
    scale per `group` of them, then the trailing `rope` values in bfloat16; the row padded to 4 bytes (so float32 and
    bfloat16 views of the pages line up). V4-Flash's entry (512, 64, 64): 448 + 28 + 128 = 604 bytes (bf16: 1024);
    its index key (128, 0, 128): 132 bytes (bf16: 256)."""

    dim: int
    rope: int
    group: int

    def __post_init__(self) -> None:
        if not (0 <= self.rope < self.dim and self.group > 0):
            raise ValueError(f"FP8Rows(dim={self.dim}, rope={self.rope}, group={self.group}) is invalid: must have "
                             "0 <= rope < dim and group > 0.")

    @property
    def nope(self) -> int:
        return self.dim - self.rope

    @property
    def groups(self) -> int:
        return -(-self.nope // self.group)

    @property
    def scale_offset(self) -> int:
        """Byte offset of the scales (a multiple of 4)."""
        return _up(self.nope, 4)

    @property
    def rope_offset(self) -> int:
        """Byte offset of the bfloat16 rope values (a multiple of 4)."""
        return self.scale_offset + 4 * self.groups

    @property
    def row_bytes(self) -> int:
        return _up(self.rope_offset + 2 * self.rope, 4)

    def encode(self, x_EX: torch.Tensor) -> torch.Tensor:
        """Rows [..., dim] -> uint8 [..., row_bytes]: per group scale = amax / 448 (an all-zero group: 0) and the
        values / scale rounded to e4m3; the rope values rounded to bfloat16."""
        lead, n, G = x_EX.shape[:-1], self.nope, self.groups
        x = x_EX.reshape(-1, self.dim)
        if x.shape[0] == 0:  # (a byte view of an empty scale tensor is refused)
            return torch.zeros(*lead, self.row_bytes, dtype=torch.uint8, device=x.device)
        v_EGg = torch.nn.functional.pad(x[:, :n].float(), (0, G * self.group - n)).view(-1, G, self.group)
        scale_EG = v_EGg.abs().amax(dim=2) / _FP8_MAX
        q_EGg = (v_EGg / torch.where(scale_EG > 0, scale_EG, 1.0)[..., None]).clamp(-_FP8_MAX, _FP8_MAX)
        row = torch.zeros(x.shape[0], self.row_bytes, dtype=torch.uint8, device=x.device)
        row[:, :n] = q_EGg.view(-1, G * self.group)[:, :n].to(torch.float8_e4m3fn).view(torch.uint8)
        row[:, self.scale_offset: self.rope_offset] = scale_EG.contiguous().view(torch.uint8)
        if self.rope:
            row[:, self.rope_offset: self.rope_offset + 2 * self.rope] = (
                x[:, n:].to(torch.bfloat16).contiguous().view(torch.uint8))
        return row.view(*lead, self.row_bytes)

    def decode(self, rows_EX: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 rows [..., row_bytes] -> [..., dim] in `dtype` (e4m3 * scale in float32, then cast; the rope values
        widened from bfloat16)."""
        lead, n, G = rows_EX.shape[:-1], self.nope, self.groups
        r = rows_EX.reshape(-1, self.row_bytes)
        if r.shape[0] == 0:
            return torch.zeros(*lead, self.dim, dtype=dtype, device=r.device)
        q = r[:, :n].contiguous().view(torch.float8_e4m3fn).float()
        scale = r[:, self.scale_offset: self.rope_offset].contiguous().view(torch.float32)
        out = [(q * scale.repeat_interleave(self.group, dim=1)[:, :n]).to(dtype)]
        if self.rope:
            out.append(r[:, self.rope_offset: self.rope_offset + 2 * self.rope].contiguous().view(torch.bfloat16)
                       .to(dtype))
        return torch.cat(out, dim=1).view(*lead, self.dim)

    def round_trip(self, x_EX: torch.Tensor) -> torch.Tensor:
        """What a row reads back as once cached: decode(encode(x)) in x's dtype (the oracle's fake quantization)."""
        return self.decode(self.encode(x_EX), x_EX.dtype)


def entry_rows(head_dim: int, rotary_dim: int) -> FP8Rows:
    """An fp8 entry's (and window row's) layout."""
    return FP8Rows(head_dim, rotary_dim, ENTRY_SCALE_GROUP)


def index_key_rows(index_head_dim: int) -> FP8Rows:
    """An fp8 index key's layout (DSA's row)."""
    return FP8Rows(index_head_dim, 0, INDEX_SCALE_GROUP)


def is_fp8_pages(pages: torch.Tensor | None) -> bool:
    """Whether a cache tensor holds fp8 rows as bytes (FP8Rows), not float values."""
    return pages is not None and pages.dtype == torch.uint8


def read_rows(pages: torch.Tensor, rows: FP8Rows | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows as values in `dtype`: decoded from fp8 bytes, else cast."""
    return rows.decode(pages, dtype) if is_fp8_pages(pages) else pages.to(dtype)


def write_form(pages: torch.Tensor, rows: FP8Rows | None, x_EX: torch.Tensor) -> torch.Tensor:
    """Rows in the form `pages` stores them: fp8-encoded bytes, else cast to its dtype."""
    return rows.encode(x_EX) if is_fp8_pages(pages) else x_EX.to(pages.dtype)


def reference_rope_tail(x_TNH: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor) -> torch.Tensor:
    """Interleaved rope on the trailing R = 2h dims of every head: pairs (2i, 2i + 1) rotate by (cos, sin)[i];
    the leading dims pass. cos/sin are float32 tables (the inverse rotation passes -sin)."""
    R = 2 * cos_Th.shape[-1]
    cos = cos_Th.to(x_TNH.dtype).repeat_interleave(2, dim=-1)[:, None, :]
    sin = sin_Th.to(x_TNH.dtype).repeat_interleave(2, dim=-1)[:, None, :]
    rope = x_TNH[..., -R:].float()
    rotated_ = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    out = ((rope * cos) + (rotated_ * sin)).to(x_TNH.dtype)
    return torch.cat([x_TNH[..., :-R], out], dim=-1)


def reference_rms_norm_f32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """V4's RMSNorm: in float32, times a float32 weight, cast back once. Unweighted (weight None, the query's
    per-head norm): only the scale is computed in float32, x keeps its dtype."""
    if weight is None:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def reference_compress(kv_nmC: torch.Tensor, gate_nmC: torch.Tensor, prev_kv_nmH: torch.Tensor | None,
                       prev_gate_nmH: torch.Tensor | None) -> torch.Tensor:
    """One entry per window: the softmax-over-tokens (float32) gated sum of the window's kv rows. Without
    `prev_*` (HCA) kv/gate are the window's [n, m, H] rows; with them (CSA) kv/gate are [n, m, 2H] and the entry
    softmaxes over 2m rows: the previous window's Ca half (prev_*, [n, m, H]; a gate of -inf where there is no
    previous window) then this window's Cb half. Returns [n, H] before the entry norm and rope."""
    if prev_kv_nmH is not None:
        H = prev_kv_nmH.shape[-1]
        kv_nmC = torch.cat([prev_kv_nmH, kv_nmC[..., H:]], dim=1)
        gate_nmC = torch.cat([prev_gate_nmH, gate_nmC[..., H:]], dim=1)
    weights = gate_nmC.softmax(dim=1, dtype=torch.float32).to(kv_nmC.dtype)
    return (kv_nmC * weights).sum(dim=1)


def reference_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_EI: torch.Tensor, visible_T: torch.Tensor,
                           top_k: int) -> torch.Tensor:
    """The lightning indexer's choice per query: score[t, e] = sum_h w[t, h] * n_I^-0.5 * relu(q[t, h] . key[e]) *
    I^-0.5 in float32 (transformers casts q, keys and the weights to float32; the weights projection's output `w_Tn`
    comes unscaled), then the top_k entries of highest score among the first visible_T[t] (all of them when fewer),
    ties to the lowest entries (kernels/dsa.reference_topk_positions, DeepSeek Sparse Attention's rule): int32
    [T, top_k] entry ids, ascending, then -1. keys_EI: [E, I] shared by the queries (one sequence's), or [T, E, I]
    each query's own (a batched decode step's rows, gathered through their block tables)."""
    n_I, I = q_TnI.shape[1], q_TnI.shape[2]
    spec = "tni,tei->tne" if keys_EI.dim() == 3 else "tni,ei->tne"
    scores_TnE = torch.relu(torch.einsum(spec, q_TnI.float(), keys_EI.float())) * I**-0.5
    scores_TE = (scores_TnE * (w_Tn.float() * n_I**-0.5)[:, :, None]).sum(dim=1)
    return reference_topk_positions(scores_TE, visible_T, top_k)


def reference_sink_attention(q_TNH: torch.Tensor, k_SH: torch.Tensor, allowed_TS: torch.Tensor, sinks_N: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Multi-query attention over one shared head that is key and value (V4: K = V), with a learnable logit per
    head in every softmax's denominator (its sink, no value): out [T, N, H]. allowed_TS: which keys each query sees
    (a query sees at least itself). k_SH: [S, H] shared by the queries (one sequence's), or [T, S, H] each query's
    own (a batched decode step's rows)."""
    per_query = k_SH.dim() == 3
    logits_TNS = torch.einsum("tnh,tsh->tns" if per_query else "tnh,sh->tns", q_TNH, k_SH) * scale
    logits_TNS = logits_TNS.masked_fill(~allowed_TS[:, None, :], float("-inf"))
    sinks = sinks_N.to(logits_TNS.dtype)[None, :, None].expand(q_TNH.shape[0], -1, 1)
    combined = torch.cat([logits_TNS, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.einsum("tns,tsh->tnh" if per_query else "tns,sh->tnh", probs.to(k_SH.dtype), k_SH)


def gather_paged_rows(pages_BLcX: torch.Tensor, table_TM: torch.Tensor, e_TE: torch.Tensor) -> torch.Tensor:
    """Rows e_TE of each query's sequence from its pages, [T, E', X]: row e sits in block table[t, e // Lc] at
    e mod Lc. Ids must be >= 0 and inside the table (callers clamp or mask them)."""
    Lc = pages_BLcX.shape[1]
    return pages_BLcX[table_TM.long().gather(1, e_TE // Lc), e_TE % Lc]


def _visible_pages(pages_BLcX: torch.Tensor, table_TM: torch.Tensor, visible_T: torch.Tensor,
                   rows: FP8Rows | None = None, dtype: torch.dtype | None = None):
    """Every row the block tables address (E = table width x Lc, a host bound), as values (fp8 rows decoded by
    `rows` into `dtype`), rows at or past visible_T[t] zeroed (a never-written row may hold NaN), and which are
    visible: ([T, E, X], bool [T, E])."""
    T, E = table_TM.shape[0], table_TM.shape[1] * pages_BLcX.shape[1]
    e_TE = torch.arange(E, device=pages_BLcX.device)[None, :].expand(T, -1)
    seen_TE = e_TE < visible_T[:, None]
    got = gather_paged_rows(pages_BLcX, table_TM, e_TE)
    if is_fp8_pages(pages_BLcX):
        got = rows.decode(got, dtype)
    return torch.where(seen_TE[..., None], got, 0), seen_TE


visible_pages = _visible_pages  # the batch-invariant backend gathers the same way (batch_invariant_compressed.py)


def reference_paged_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_BLcI: torch.Tensor,
                                 table_TM: torch.Tensor, visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """reference_indexer_topk for a batched decode step whose index keys stay in their pages: query t scores the
    first visible_T[t] keys of its sequence, key e in block table_TM[t, e // Lc] at e mod Lc (keys_BLcI
    [B, Lc, I], or fp8 rows uint8 [B, Lc, X]: index_key_rows(I)). int32 [T, top_k] entry ids, ascending, then -1.
    Here the keys are gathered first (the oracle); the Triton op reads them through the table."""
    keys_TEI, _ = _visible_pages(keys_BLcI, table_TM, visible_T, index_key_rows(q_TnI.shape[2]), torch.float32)
    return reference_indexer_topk(q_TnI, w_Tn, keys_TEI, visible_T, top_k)


def window_seen(pos_T: torch.Tensor, slot_T: torch.Tensor, W: int) -> torch.Tensor:
    """bool [T, W]: which rows of a query's window ring it sees. The ring row r of the query at position p holds
    position p - ((p - r) mod W), seen where that is >= 0; a query without a slot (slot < 0: a padding row) sees
    none."""
    r_W = torch.arange(W, device=pos_T.device)
    p_T1 = pos_T.long()[:, None]
    return (p_T1 - (p_T1 - r_W[None, :]) % W >= 0) & (slot_T[:, None] >= 0)


def reference_paged_sink_attention(q_TNH: torch.Tensor, window_PWH: torch.Tensor, slot_T: torch.Tensor,
                                   pos_T: torch.Tensor, entries_BLcH: torch.Tensor | None,
                                   table_TM: torch.Tensor | None, picks_TK: torch.Tensor | None,
                                   visible_T: torch.Tensor | None, sinks_N: torch.Tensor, scale: float, *,
                                   rope_dims: int = 0) -> torch.Tensor:
    """reference_sink_attention for a batched decode step whose keys stay where the cache keeps them: query t (at
    position pos_T[t]) attends to its window ring window_PWH[slot_T[t]] (the rows window_seen gives) and to
    entries of its sequence's pages entries_BLcH [B, Lc, H] (entry e in block table_TM[t, e // Lc] at e mod Lc):
    the ids picks_TK [T, K] (CSA: the indexer's, -1 for none; a row's valid picks within its first visible_T[t]
    columns, as the indexer leaves them: the Triton op reads no further) or, with picks_TK None, every entry below
    visible_T[t] (HCA); with entries_BLcH None (a sliding layer) the window only. Rows it does not see are zeroed
    first (a ring row of a slot's earlier request, a never-written entry). Out [T, N, H] in q's dtype. fp8 entries
    and window rows (uint8 [B, Lc, X] / [P, W, X]) are decoded as entry_rows(H, rope_dims) lays them out. Here the
    keys are gathered into [T, W + K or E, H] (the oracle); the Triton op reads them in place."""
    fmt = entry_rows(q_TNH.shape[2], rope_dims)
    keys_TWH = window_PWH[slot_T.long().clamp(min=0)]
    if is_fp8_pages(window_PWH):
        keys_TWH = fmt.decode(keys_TWH, q_TNH.dtype)
    seen_TW = window_seen(pos_T, slot_T, window_PWH.shape[1])
    keys_TSH, seen_TS = with_paged_entries(keys_TWH, seen_TW, entries_BLcH, table_TM, picks_TK, visible_T, fmt,
                                           q_TNH.dtype)
    return reference_sink_attention(q_TNH, keys_TSH, seen_TS, sinks_N, scale)


def with_paged_entries(keys_TWH: torch.Tensor, seen_TW: torch.Tensor, entries_BLcH: torch.Tensor | None,
                       table_TM: torch.Tensor | None, picks_TK: torch.Tensor | None, visible_T: torch.Tensor | None,
                       fmt: FP8Rows, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's keys [T, W + K or E, H] and which each query sees: its window rows (unseen ones zeroed), then
    its entries (the picks, or every visible one; none on a sliding layer), fp8 pages decoded by `fmt`. What the
    paged sink attention reads, here and in the batch-invariant backend (batch_invariant_compressed.py)."""
    rows = fmt if is_fp8_pages(entries_BLcH) else None
    if entries_BLcH is None:
        ent_TEH, seen_TE = keys_TWH[:, :0], seen_TW[:, :0]
    elif picks_TK is None:
        ent_TEH, seen_TE = _visible_pages(entries_BLcH, table_TM, visible_T, rows, dtype)
    else:
        picks = picks_TK.long()
        seen_TE = picks >= 0
        got = gather_paged_rows(entries_BLcH, table_TM, picks.clamp(min=0))
        ent_TEH = torch.where(seen_TE[..., None], rows.decode(got, dtype) if rows is not None else got, 0)
    keys_TSH = torch.cat([torch.where(seen_TW[..., None], keys_TWH, 0), ent_TEH], dim=1).to(dtype)
    return keys_TSH, torch.cat([seen_TW, seen_TE], dim=1)


def reference_grouped_linear(x_TGd: torch.Tensor, w_GoD: torch.Tensor) -> torch.Tensor:
    """The grouped output projection's first half: each of G groups of heads [d] projected by its own [o, d]
    block: [T, G, o]."""
    return torch.einsum("tgd,god->tgo", x_TGd, w_GoD)


__all__ = ["ENTRY_SCALE_GROUP", "FP8Rows", "INDEX_SCALE_GROUP", "entry_rows", "gather_paged_rows", "index_key_rows",
           "is_fp8_pages", "read_rows", "reference_compress", "reference_grouped_linear",
           "reference_indexer_topk", "reference_paged_indexer_topk", "reference_paged_sink_attention",
           "reference_rms_norm_f32", "reference_rope_tail", "reference_sink_attention", "visible_pages", "window_seen",
           "with_paged_entries", "write_form"]
