"""DeepSeek-V4's attention layer (engine/models/compressed_attention_config.py has the cache layout;
kernels/compressed_attention.py the math): MQA over one shared head that is key and value, per-head sinks, a sliding
window of raw KV, and under CSA / HCA the compressed entries, all read and written through the engine's cache: the paged
entries on the step's block tables, the window and the compressors' running rows in each sequence's state slot
(ForwardContext.state).

A pure-decode step runs batched from device lengths only (decode.py: what a decode CUDA graph captures); so does
each run of consecutive one-token rows in a mixed or verify step, while every longer sequence (a prefill chunk, a verify
row) runs on its own, its lengths read from the metadata's host lists (no device sync). The math goes through four ops
of the kernel strategy (kernels/ops.py), each with its reference in kernels/compressed_attention.py: `compress_kv`,
`compressed_indexer_topk`, `sink_attention`, `grouped_linear` (and the decode path's paged ops) (Triton:
kernels/triton_compressed_attention.py, triton_compressed_topk.py; the indexer's picks may come in any order). A step's
work per sequence, queries at positions p0..p1-1:
1. the new tokens' kv (normed, roped), their compressor rows (kv | gate + position bias) and, under CSA, the
   indexer's rows;
2. every window that completes inside [p0, p1) becomes an entry (and an indexer key), written to its block;
3. the window ring and the compressor rings take the new tokens' rows;
4. each query attends to its window (positions p - W < k <= p) and to the entries it may see (entry w summarises
   positions < (w + 1) m, so query p sees w < (p + 1) / m): all of them (HCA) or the indexer's top-k (CSA);
5. the output's rope slice is rotated back by the query's position, then the grouped output projection.
Under an fp8 KV cache (engine/models/compressed_attention_config.py) the paged entries and index keys, and the window ring
where the layer's config says so (`window_fp8`), are uint8 rows (kernels/compressed_attention.FP8Rows): written
quantized (`write_form`), read back dequantized into the activations' dtype (`read_rows`; the decode ops dequantize
inside their kernels); a prefill chunk's own keys are attended to as the ring holds them (quantized), as a decode step
reads its own from the ring.

Under tensor parallelism (`tp`, docs/tensor-parallelism.md) a rank holds num_heads / tp heads: its rows of wq_b (the
q path per head) and their sinks, its o_groups / tp groups of wo_a (a group's d channels are its heads', so the rank's
heads feed exactly its groups) and their columns of wo_b, which is row-parallel (one all-reduce of [T, D] per layer).
The single shared KV head (key and value), the compressors and their entries, the indexer (its weights, its keys and
its top-k) and the window ring are every head's: each rank holds them whole, computes them from the same input and
caches them whole, as MLA's latent is (engine/models/mla.py); so the ranks pick the same entries with no collective.

The linears (wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b) are `Linear`s (engine/models/linear.py): float for a
float checkpoint (F.linear, as transformers), FP8 with float32 block scales for DeepSeek's published FP8 files (W8A8
through the kernel strategy's `fp8_linear`; wo_a group by group: engine/models/deepseek_v4/weights.py says why and how the
`.scale` tensors load). The compressors' wkv / wgate and the indexer's weights_proj ship in bf16 and stay plain.

Legend: T tokens, N heads, H head_dim, R rotary dims (h = R / 2), Q q_lora_rank, D hidden, G o_groups, O o_lora_rank,
m compress rate, W window, n_I / I indexer heads / head dim, P state slots, B blocks, L block size, E entries.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.kernels.compressed_attention import (entry_rows, index_key_rows, is_fp8_pages, read_rows,
                                                  reference_rms_norm_f32, reference_rope_tail, write_form)
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..compressed_attention_config import CompressedAttentionConfig
from .reader import DSV4Quantization
from ...tp.attention import shard_attention
from ...tp.group import TensorParallel
from ...tp.linear import ColumnParallel, RowParallel
from .decode import decode_attention
from .weights import dsv4_linear_method, grouped_fp8_linear, published_linear_plan
from ..layers import ForwardContext, param
from ..linear import Linear

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class RopeTable(nn.Module):
    """cos / sin of one V4 rope, float32 [P, h]: angles as transformers computes them (positions and inverse
    frequencies in float32)."""

    def __init__(self, inv_freq_h: torch.Tensor, attention_factor: float, max_positions: int, device=None):
        super().__init__()
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq_h.float()[None, :]
        self.register_buffer("cos_Ph", (freqs.cos() * attention_factor).to(device), persistent=False)
        self.register_buffer("sin_Ph", (freqs.sin() * attention_factor).to(device), persistent=False)

    def rotate(self, x_TNH: torch.Tensor, positions_T: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        sin = self.sin_Ph[positions_T]
        return reference_rope_tail(x_TNH, self.cos_Ph[positions_T], -sin if inverse else sin)


class Compressor(nn.Module):
    """A compressor's weights (the attention's, at H; CSA's indexer's, at I) and its step: rows for new tokens,
    entries for the windows they complete."""

    def __init__(self, hidden: int, width: int, rate: int, overlap: bool, eps: float, kernels: Kernels, dtype, device):
        super().__init__()
        series = 2 if overlap else 1
        self.width, self.rate, self.overlap, self.eps = width, rate, overlap, eps
        self.compress = kernels.compress_kv
        self.wkv_CD = param(series * width, hidden, dtype=dtype, device=device)
        self.wgate_CD = param(series * width, hidden, dtype=dtype, device=device)
        self.ape_mC = param(rate, series * width, dtype=torch.float32, device=device)  # position bias in a window
        self.norm_H = param(width, dtype=torch.float32, device=device)

    def rows(self, h_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """[T, 2C'] in at least float32: each token's kv then its gate (plus the float32 position bias of its place
        in the window, the sum kept in float32 as transformers does)."""
        gate = F.linear(h_TD, self.wgate_CD) + self.ape_mC[positions_T % self.rate]
        return torch.cat([F.linear(h_TD, self.wkv_CD).to(gate.dtype), gate], dim=-1)

    def entries(self, rows_XC: torch.Tensor, base: int, windows: range, rope: RopeTable,
                dtype: torch.dtype) -> torch.Tensor:
        """The entries of `windows` (complete) from the rows of positions base.. ([E, width] in `dtype`, the
        activations': the kv rows are weighted in it, as transformers does; normed, roped at position w * m)."""
        m, half = self.rate, rows_XC.shape[-1] // 2
        n = len(windows)
        first = windows.start * m - base
        kv = rows_XC[first: first + n * m, :half].reshape(n, m, half).to(dtype)
        gate = rows_XC[first: first + n * m, half:].reshape(n, m, half)
        prev_kv = prev_gate = None
        if self.overlap:  # the previous window's Ca half; none before window 0 (softmax weight 0)
            H = self.width
            prev_kv = kv.new_zeros(n, m, H)
            prev_gate = gate.new_full((n, m, H), float("-inf"))
            for j, w in enumerate(windows):
                if w > 0:
                    lo = (w - 1) * m - base
                    prev_kv[j] = rows_XC[lo: lo + m, :H].to(dtype)
                    prev_gate[j] = rows_XC[lo: lo + m, half: half + H]
        pooled = self.compress(kv, gate, prev_kv, prev_gate)
        normed = reference_rms_norm_f32(pooled, self.norm_H, self.eps)
        pos = torch.arange(windows.start, windows.stop, device=rows_XC.device) * m
        return rope.rotate(normed[:, None, :], pos)[:, 0, :]

    def weight_plan(self, p: str) -> WeightPlan:
        return {p + "wkv.weight": PlanEntry(self.wkv_CD, ()), p + "wgate.weight": PlanEntry(self.wgate_CD, ()),
                p + "ape": PlanEntry(self.ape_mC, ()), p + "norm.weight": PlanEntry(self.norm_H, ())}


class DSV4Attention(nn.Module):
    """One V4 attention layer (module docstring). `ropes`: {"main": RopeTable, "compress": RopeTable}; `quant`: the
    checkpoint's published FP8 format (None: a float checkpoint); `tp`: the rank's TensorParallel (None: whole), its
    heads and output groups a 1/size share (module docstring)."""

    def __init__(self, cfg: CompressedAttentionConfig, layer_idx: int, hidden: int, ropes: dict, kernels: Kernels,
                 dtype, device, quant: DSV4Quantization | None = None, tp: TensorParallel | None = None):
        super().__init__()
        size = tp.size if tp is not None else 1
        cfg = shard_attention(cfg, size)  # num_heads and o_groups this rank's (engine/tp/attention.py)
        self.head0 = tp.rank * cfg.num_heads if size > 1 else 0  # this rank's first (global) head
        self.cfg, self.layer_idx = cfg, layer_idx
        self.indexer_topk = kernels.compressed_indexer_topk
        self.sink_attention = kernels.sink_attention
        # the decode path's (decode.py): keys read through the block table in the kernels
        self.paged_indexer_topk = kernels.paged_compressed_indexer_topk
        self.paged_sink_attention = kernels.paged_sink_attention
        self.grouped_linear = kernels.grouped_linear
        N, H, Q, G, O = cfg.num_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
        self.rope = ropes["main" if cfg.layer_kind == "sliding" else "compress"]
        self.compress_rope = ropes["compress"]
        method = dsv4_linear_method(quant)
        self.file_block_rows = quant.block[0] if quant is not None else None  # wo_a's scales may be held finer

        def linear(k: int, n: int, m=method, parallel=None) -> Linear:
            return Linear(k, n, m, kernels, dtype, device, parallel=parallel)

        q_rows = o_rows = o_cols = None  # whole (no TP)
        if size > 1:  # N, G are this rank's: heads [h0, h0 + N), groups [g0, g0 + G)
            g0 = tp.rank * G
            q_rows = ColumnParallel((self.head0 * H,), (N * H,))
            o_rows = ColumnParallel((g0 * O,), (G * O,))
            o_cols = RowParallel(tp, g0 * O, G * O)
        self.wq_a = linear(hidden, Q)  # [Q, D]
        self.q_norm_Q = param(Q, dtype=torch.float32, device=device)
        self.wq_b = linear(Q, N * H, parallel=q_rows)  # [N H, Q]
        self.wkv = linear(hidden, H)  # [H, D]
        self.kv_norm_H = param(H, dtype=torch.float32, device=device)
        # [G O, d]: group g's O rows
        self.wo_a = linear(N * H // G, G * O, dsv4_linear_method(quant, group_rows=O), parallel=o_rows)
        self.wo_b = linear(G * O, hidden, parallel=o_cols)  # [D, G O]: all-reduced under TP
        self.sinks_N = param(N, dtype=torch.float32, device=device)
        # A layer's ctx.kv_caches entry: its paged tensors (cache_shapes), then its state pools (state_shapes).
        self.num_paged = len(cfg.cache_shapes(1, cfg.compress_rate or 1))
        # Each paged tensor's fp8 row layout (used only where the cache is fp8: uint8 pages).
        self.row_formats = (((entry_rows(H, cfg.rope.rotary_dim),)
                             + ((index_key_rows(cfg.index_head_dim),) if cfg.layer_kind == "csa" else ()))
                            if cfg.compress_rate else ())
        self.window_rows = entry_rows(H, cfg.rope.rotary_dim)  # the window ring's, when it is fp8
        self.compressor = self.indexer = None
        if cfg.compress_rate:
            self.compressor = Compressor(hidden, H, cfg.compress_rate, cfg.layer_kind == "csa", cfg.rms_norm_eps,
                                         kernels, dtype, device)
        if cfg.layer_kind == "csa":
            self.indexer = Compressor(hidden, cfg.index_head_dim, cfg.compress_rate, True, cfg.rms_norm_eps, kernels,
                                      dtype, device)
            self.wq_idx = linear(Q, cfg.index_n_heads * cfg.index_head_dim)  # [n_I I, Q]
            self.w_idx_nD = param(cfg.index_n_heads, hidden, dtype=dtype, device=device)

    def forward(self, positions_T: torch.Tensor, h_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cfg = self.cfg
        T, N, H, eps = h_TD.shape[0], cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
        q_res_TQ = reference_rms_norm_f32(self.wq_a(h_TD), self.q_norm_Q, eps)
        q_TNH = reference_rms_norm_f32(self.wq_b(q_res_TQ).view(T, N, H), None, eps)
        q_TNH = self.rope.rotate(q_TNH, positions_T)
        kv_TH = reference_rms_norm_f32(self.wkv(h_TD), self.kv_norm_H, eps)
        kv_TH = self.rope.rotate(kv_TH[:, None, :], positions_T)[:, 0, :]
        caches = ctx.kv_caches[self.layer_idx]
        paged, state = caches[:self.num_paged], caches[self.num_paged:]
        rows = idx = None
        if self.compressor is not None:
            rows = self.compressor.rows(h_TD, positions_T)
        if self.indexer is not None:
            nI, I = cfg.index_n_heads, cfg.index_head_dim
            idx = (self.indexer.rows(h_TD, positions_T),
                   self.compress_rope.rotate(self.wq_idx(q_res_TQ).view(T, nI, I), positions_T),
                   F.linear(h_TD, self.w_idx_nD))
        if ctx.attn.max_query_len == 1:  # pure decode: batched, device lengths only (graph-capturable)
            out_TNH = self._decode(q_TNH, kv_TH, rows, idx, ctx, paged, state)
        else:
            out_TNH = self._sequences(q_TNH, kv_TH, rows, idx, ctx, paged, state)
        out_TNH = self.rope.rotate(out_TNH, positions_T, inverse=True)
        G = cfg.o_groups
        o_TGO = grouped_fp8_linear(self.wo_a, out_TNH.reshape(T, G, -1), self.grouped_linear)
        return self.wo_b(o_TGO.reshape(T, -1))

    def _decode(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        """A pure-decode step, batched from device lengths (decode.py)."""
        return decode_attention(self, q_TNH, kv_TH, rows, idx, ctx, paged, state)

    def _sequences(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        """A prefill, mixed or verify step: each run of consecutive one-token rows batched as a decode step (so that
        a chunk of prefill beside a few hundred decode rows does not loop over them), every other sequence on its
        own, from the host lengths."""
        out_TNH = torch.empty_like(q_TNH)
        attn, slots_S, tables_SM = ctx.attn, ctx.state.slots_S.long(), ctx.attn.block_tables_SM.long()
        part = lambda x, sl: x[sl] if x is not None else None  # noqa: E731
        t0, s, S = 0, 0, len(attn.query_lens)
        while s < S:
            q_len, p1 = attn.query_lens[s], attn.seq_lens[s]
            if q_len == 1:  # a run of decode rows [s, s1): decode.py, from device lengths
                s1 = s + 1
                while s1 < S and attn.query_lens[s1] == 1:
                    s1 += 1
                sl = slice(t0, t0 + s1 - s)
                run = ForwardContext(attn.select(s, s1), ctx.kv_caches,
                                     state=dataclasses.replace(ctx.state, slots_S=ctx.state.slots_S[s:s1]))
                out_TNH[sl] = self._decode(q_TNH[sl], kv_TH[sl], part(rows, sl),
                                           tuple(x[sl] for x in idx) if idx is not None else None, run, paged, state)
                t0, s = sl.stop, s1
                continue
            if q_len > 0:
                sl = slice(t0, t0 + q_len)
                out_TNH[sl] = self._sequence(q_TNH[sl], kv_TH[sl], part(rows, sl),
                                             tuple(x[sl] for x in idx) if idx is not None else None, p1 - q_len, p1,
                                             slots_S[s], tables_SM[s], paged, state)
                t0 += q_len
            s += 1
        return out_TNH

    def _sequence(self, q_qNH, kv_qH, rows_qC, idx, p0: int, p1: int, slot, table_M, paged, state) -> torch.Tensor:
        """One sequence's queries p0..p1-1: cache work (steps 1-3 of the module docstring), then attention."""
        cfg = self.cfg
        W, dev = cfg.sliding_window, kv_qH.device
        window_PWH, fmt = state[0], self.window_rows
        stored_qX = write_form(window_PWH, fmt, kv_qH)  # encoded once: what the ring holds
        if is_fp8_pages(window_PWH):
            kv_qH = read_rows(stored_qX, fmt, kv_qH.dtype)
        lo = max(0, p0 - W + 1)
        old_H = read_rows(window_PWH[slot][torch.arange(lo, p0, device=dev) % W], fmt, kv_qH.dtype)
        keys = torch.cat([old_H, kv_qH])  # positions lo..p1-1
        keep = torch.arange(max(p0, p1 - W), p1, device=dev)
        window_PWH[slot, keep % W] = stored_qX[keep - p0]
        q_pos = torch.arange(p0, p1, device=dev)
        k_pos = torch.arange(lo, p1, device=dev)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - W)
        if self.compressor is not None:
            m = cfg.compress_rate
            entries_EH = self._compress(self.compressor, rows_qC, state[1], paged[0], self.row_formats[0], p0, p1, slot,
                                        table_M, q_qNH.dtype)
            visible_q = (q_pos + 1) // m  # entry w summarises positions < (w + 1) m
            e_pos = torch.arange(entries_EH.shape[0], device=dev)
            seen = e_pos[None, :] < visible_q[:, None]
            if self.indexer is not None:  # only the indexer's top-k of the visible entries
                irows, iq_qnI, iw_qn = idx
                keys_EI = self._compress(self.indexer, irows, state[2], paged[1], self.row_formats[1], p0, p1, slot,
                                         table_M, q_qNH.dtype)
                picks_qK = self.indexer_topk(iq_qnI, iw_qn, keys_EI, visible_q, cfg.index_topk).long()
                chosen = torch.zeros(seen.shape[0], seen.shape[1] + 1, dtype=torch.bool, device=dev)
                chosen.scatter_(1, torch.where(picks_qK >= 0, picks_qK, seen.shape[1]), True)  # -1: a spare column
                seen = chosen[:, :-1]
            keys = torch.cat([keys, entries_EH])
            allowed = torch.cat([allowed, seen], dim=1)
        return self.sink_attention(q_qNH, keys, allowed, self.sinks_N, cfg.softmax_scale)

    def _compress(self, comp: Compressor, rows_qC, ring_PXC, entries_BLcH, fmt, p0: int, p1: int, slot,
                  table_M, dtype: torch.dtype) -> torch.Tensor:
        """Writes the entries of the windows that complete in [p0, p1) into their blocks (fp8 pages: quantized as
        `fmt` lays them out), moves the ring on, and returns every entry of the sequence so far ([p1 // m, width] in
        `dtype`, the activations', read back from the blocks: what a later step reads)."""
        m, ring, dev = comp.rate, ring_PXC.shape[1], rows_qC.device
        L = entries_BLcH.shape[1] * m  # the block size
        base = max(0, (p0 // m - (1 if comp.overlap else 0)) * m)
        rows = torch.cat([ring_PXC[slot][torch.arange(base, p0, device=dev) % ring], rows_qC])
        windows = range(p0 // m, p1 // m)
        if len(windows):
            new_EH = comp.entries(rows, base, windows, self.compress_rope, dtype)
            at = torch.arange(windows.start, windows.stop, device=dev) * m
            entries_BLcH[table_M[at // L], (at % L) // m] = write_form(entries_BLcH, fmt, new_EH)
        keep = torch.arange(max(p0, p1 - ring), p1, device=dev)
        ring_PXC[slot, keep % ring] = rows_qC[keep - p0].to(ring_PXC.dtype)
        at = torch.arange(p1 // m, device=dev) * m
        return read_rows(entries_BLcH[table_M[at // L], (at % L) // m], fmt, dtype)

    def weight_plan(self, p: str) -> WeightPlan:
        """The published names under `p` = "model.layers.{i}.attn." (an FP8 linear's `X.scale` beside `X.weight`)."""
        plan = {p + "q_norm.weight": PlanEntry(self.q_norm_Q, ()), p + "norm.weight": PlanEntry(self.kv_norm_H, ()),
                p + "attn_sink": PlanEntry(self.sinks_N, (), self._own_heads())}
        for name in ("wq_a", "wq_b", "wkv", "wo_b"):
            plan.update(published_linear_plan(getattr(self, name), f"{p}{name}.weight"))
        plan.update(published_linear_plan(self.wo_a, p + "wo_a.weight", self.file_block_rows))
        if self.compressor is not None:
            plan.update(self.compressor.weight_plan(p + "compressor."))
        if self.indexer is not None:
            plan.update(self.indexer.weight_plan(p + "indexer.compressor."))
            plan.update(published_linear_plan(self.wq_idx, p + "indexer.wq_b.weight"))
            plan[p + "indexer.weights_proj.weight"] = PlanEntry(self.w_idx_nD, ())
        return plan

    def _own_heads(self) -> tuple:
        """The checkpoint slice of this rank's heads in a per-head tensor (the sinks): () whole."""
        if isinstance(self.wo_b.parallel, RowParallel):
            return (slice(self.head0, self.head0 + self.cfg.num_heads),)
        return ()


__all__ = ["Compressor", "DSV4Attention", "RopeTable"]
