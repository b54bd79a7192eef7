"""DeepSeek-V4.1's attention layer, kind "shared_compressed" (its cache layout:
engine/models/shared_compressed_attention_config.py): V4's latent shared-KV attention (one KV head that is its own value, per-head sinks, a sliding window of raw KV, the output's rope
tail rotated back, a grouped low-rank output projection), with CSA2's shared compressed KV: a KV-source layer writes
its group's entries (and index keys) into its pages, the layers after it read them from there, and each query attends
to the entries its group's latest index source picked.

A step's work per sequence, queries at positions p0..p1-1 (every sequence on its own, lengths from the metadata's
host lists; a batched decode path is not built yet):
1. q from the low-rank path; the new tokens' kv (normed, roped, FP8 fake-quantized) join the window ring;
2. at a KV source: the groups that complete in [p0, p1) become entries (rate 1: each token's normed kv; rate m:
   m rows pooled by a softmax gate, in float32, the rows of a group still filling kept in the state ring), each roped
   at its first position and FP4 fake-quantized into its block, and their index keys (k_norm(wk(latent)), roped,
   FP4) beside them;
3. at an index source: each query's scores over the visible entries (entry w is visible to query p when
   w < (p + 1) / m), restricted to the candidate blocks where the candidate source published them, and its top-k
   published for the group's later layers (`scratch`, below); a reusing layer reads the picks;
4. attention over the window (p - W < k <= p) and the picked entries, the sinks in the softmax's denominator.

The picks and the candidate blocks cross layers of one forward through `scratch`, a dict the model's V4.1 layers
share (built once per model), keyed by (the step's metadata, the sequence's row): an index source writes every
sequence of the step before any later layer of its group reads it, so nothing of an earlier step is read, and the
first layer empties it each forward (a micro-batch's first layer runs before any of either micro-batch's second).

Legend: T tokens, q a sequence's queries, N heads, H head_dim, Q q_lora_rank, D hidden, G o_groups, O o_lora_rank,
E a sequence's entries, m compress rate, W window, nI / I indexer heads / head dim.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...tp.attention import shard_attention
from ...tp.group import TensorParallel
from ..layers import ForwardContext, param
from ..shared_compressed_attention_config import SharedCompressedAttentionConfig
from .fake_quant import fp4_block, fp8_block
from .rope import RopeTable

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' V4.1 RMSNorm: normalised in float32, cast back to x's dtype, then scaled by the weight."""
    x32 = x.float()
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else weight * out


class Norm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def candidate_blocks(scores_qE: torch.Tensor, visible_q: torch.Tensor, topk_blocks: int, size: int) -> torch.Tensor:
    """The candidate source's two-level top-k: per query the `topk_blocks` best blocks of `size` entries (a block
    scores its best visible entry; the block of the query's newest entry always kept), as a mask over the entries."""
    E = scores_qE.shape[1]
    blocks = F.pad(scores_qE, (0, -E % size), value=float("-inf")).unflatten(-1, (-1, size)).amax(-1)
    nb = blocks.shape[1]
    newest = ((visible_q - 1) // size)[:, None]
    blocks = blocks.masked_fill(torch.arange(nb, device=blocks.device)[None, :] == newest, float("inf"))
    top = blocks.topk(min(topk_blocks, nb), dim=-1)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
    return keep.repeat_interleave(size, dim=-1)[:, :E]


class Indexer(nn.Module):
    """An index source's weights: its query path (from the attention's q latent) and head weights, and at a KV
    source the key path over the compressor's latent."""

    def __init__(self, cfg: SharedCompressedAttentionConfig, hidden: int, dtype, device):
        super().__init__()
        nI, I = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = param(nI * I, cfg.q_lora_rank, dtype=dtype, device=device)
        self.weights_proj = param(nI, hidden, dtype=dtype, device=device)
        self.owns_keys = cfg.index == "keys"
        if self.owns_keys:
            self.wk = param(I, cfg.head_dim, dtype=dtype, device=device)
            self.k_norm = Norm(I, cfg.rms_norm_eps, dtype, device)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = {p + "wq_b.weight": PlanEntry(self.wq_b, ()),
                p + "weights_proj.weight": PlanEntry(self.weights_proj, ())}
        if self.owns_keys:
            plan.update({p + "wk.weight": PlanEntry(self.wk, ()),
                         p + "k_norm.weight": PlanEntry(self.k_norm.weight, ())})
        return plan


class Compressor(nn.Module):
    """A KV source's compressor: rate 1 an entry per token (norm(wkv(h))), rate m > 1 m tokens pooled by a softmax
    gate over them (in float32)."""

    def __init__(self, cfg: SharedCompressedAttentionConfig, hidden: int, dtype, device):
        super().__init__()
        self.rate = cfg.compress_rate
        self.wkv = param(cfg.head_dim, hidden, dtype=dtype, device=device)
        self.wgate = param(cfg.head_dim, hidden, dtype=dtype, device=device) if self.rate > 1 else None
        self.norm = Norm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = {p + "wkv.weight": PlanEntry(self.wkv, ()), p + "norm.weight": PlanEntry(self.norm.weight, ())}
        if self.wgate is not None:
            plan[p + "wgate.weight"] = PlanEntry(self.wgate, ())
        return plan


class V41Attention(nn.Module):
    """One V4.1 attention layer (module docstring). `ropes`: {"main", "compress"} RopeTables; `scratch`: the dict the
    model's V4.1 layers share."""

    def __init__(self, cfg: SharedCompressedAttentionConfig, hidden: int, ropes: dict, scratch: dict,
                 kernels: Kernels, dtype, device, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg, self.layer_idx, self.scratch = cfg, cfg.layer_idx, scratch
        # Under TP a rank holds num_heads / size heads (their wq_b rows and sinks) and o_groups / size output groups
        # (engine/tp/attention.shard_attention: a group's channels are its heads', so wo_a's rows of those groups and
        # wo_b's columns, the output summed over the group); the shared KV head, the compressor, the indexer, the
        # window and the entries are whole on every rank (engine/config/tensor_parallel.py checks the sizes).
        self.tp = tp if tp is not None and tp.size > 1 else None
        rank = self.tp.rank if self.tp else 0
        local = shard_attention(cfg, self.tp.size if self.tp else 1)
        N, H, Q, G, O = local.num_heads, cfg.head_dim, cfg.q_lora_rank, local.o_groups, cfg.o_lora_rank
        self.N, self.G = N, G
        self.heads = (slice(rank * N * H, (rank + 1) * N * H),)  # wq_b's rows of this rank's heads
        self.sink_heads = (slice(rank * N, (rank + 1) * N),)
        self.groups = (slice(rank * G * O, (rank + 1) * G * O),)  # wo_a's rows, wo_b's columns
        self.rope = ropes["compress" if cfg.compress_rate else "main"]
        self.compress_rope: RopeTable = ropes["compress"]
        self.wq_a = param(Q, hidden, dtype=dtype, device=device)
        self.q_norm = Norm(Q, cfg.rms_norm_eps, dtype, device)
        self.wq_b = param(N * H, Q, dtype=dtype, device=device)
        self.wkv = param(H, hidden, dtype=dtype, device=device)
        self.kv_norm = Norm(H, cfg.rms_norm_eps, dtype, device)
        self.wo_a = param(G * O, N * H // G, dtype=dtype, device=device)
        self.wo_b = param(hidden, G * O, dtype=dtype, device=device)
        self.sinks_N = param(N, dtype=torch.float32, device=device)
        self.compressor = Compressor(cfg, hidden, dtype, device) if cfg.is_source else None
        self.indexer = Indexer(cfg, hidden, dtype, device) if cfg.index in ("keys", "reindex") else None
        self.num_paged = len(cfg.cache_shapes(1, cfg.compress_rate or 1))
        self._steps: dict | None = None  # a verify step's ring rows, kept for rollback.py (record_steps)

    # -- a verify step's rings (rollback.py) -----------------------------------------------------------------------
    def rings(self, ctx: ForwardContext) -> list[torch.Tensor]:
        """The state tensors indexed by position mod their length: the window [P, W, H], at a source with m > 1 the
        filling group's rows [P, m, 2 H] (the Engram look-back, the layer's last state, is not a ring)."""
        state = ctx.kv_caches[self.layer_idx][self.num_paged:]
        return list(state[:2] if self.compressor is not None and self.cfg.compress_rate > 1 else state[:1])

    def record_steps(self, steps: dict | None) -> dict | None:
        """From the next forward on, keep each step's ring rows in `steps` (None: keep nothing); returns what the
        last forward kept."""
        kept, self._steps = self._steps, steps
        return kept

    def step_rows(self, steps: dict | None) -> list[torch.Tensor]:
        """What a forward kept, T-aligned, one per ring (`rings`' order): the window KV, the compressor rows."""
        if not steps:
            raise RuntimeError(f"V4.1 layer {self.layer_idx} kept no rows of the verify step it should roll back.")
        out = [steps["kv"]]
        if self.compressor is not None and self.cfg.compress_rate > 1:
            out.append(torch.cat(steps["ring"]))
        return out

    def project(self, positions_T: torch.Tensor, h_TD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The queries [T, N, H] (low-rank, roped), the tokens' window KV [T, H] (normed, roped, FP8 fake-quantized)
        and the q latent [T, Q] (an index source's query input)."""
        T, N, H = h_TD.shape[0], self.N, self.cfg.head_dim
        q_res_TQ = self.q_norm(F.linear(h_TD, self.wq_a))
        q_TNH = self.rope.rotate(F.linear(q_res_TQ, self.wq_b).view(T, N, H), positions_T)
        kv_TH = fp8_block(self.rope.rotate(self.kv_norm(F.linear(h_TD, self.wkv)), positions_T), 32)
        return q_TNH, kv_TH, q_res_TQ

    def output(self, out_TNH: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """The heads' outputs, their rope tail rotated back, through the grouped low-rank projection [T, D]."""
        T, G = out_TNH.shape[0], self.G
        out_TNH = self.rope.rotate(out_TNH, positions_T, inverse=True)
        x_GTd = out_TNH.reshape(T, G, -1).transpose(0, 1)
        o_TGO = torch.bmm(x_GTd, self.wo_a.view(G, -1, x_GTd.shape[-1]).transpose(1, 2)).transpose(0, 1)
        y_TD = F.linear(o_TGO.reshape(T, -1), self.wo_b)
        return self.tp.all_reduce(y_TD) if self.tp is not None else y_TD

    def forward(self, positions_T: torch.Tensor, h_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cfg = self.cfg
        q_TNH, kv_TH, q_res_TQ = self.project(positions_T, h_TD)
        if self._steps is not None:
            self._steps["kv"], self._steps["ring"] = kv_TH, []
        out_TNH = torch.empty_like(q_TNH)
        attn, t0 = ctx.attn, 0
        if self.layer_idx == 0:
            self.scratch.clear()
        own = ctx.kv_caches[self.layer_idx]
        # this source's pages, and the group's (its source's): entries, index keys
        pages = (own[:self.num_paged], ctx.kv_caches[cfg.source][:2] if cfg.compress_rate else ())
        for s, (q_len, p1) in enumerate(zip(attn.query_lens, attn.seq_lens)):
            if q_len == 0:
                continue
            sl = slice(t0, t0 + q_len)
            out_TNH[sl] = self._sequence(s, p1 - q_len, p1, q_TNH[sl], kv_TH[sl], h_TD[sl], q_res_TQ[sl], ctx, pages)
            t0 += q_len
        return self.output(out_TNH, positions_T)

    def _sequence(self, s: int, p0: int, p1: int, q_qNH, kv_qH, h_qD, q_res_qQ, ctx: ForwardContext,
                  pages: tuple) -> torch.Tensor:
        cfg, dev = self.cfg, kv_qH.device
        state = ctx.kv_caches[self.layer_idx][self.num_paged:]
        slot = ctx.state.slots_S[s].long()  # a 0-d device index: no sync
        key = (id(ctx.attn), s)
        W = cfg.sliding_window
        window_PWH = state[0]
        lo = max(0, p0 - W + 1)
        keys = torch.cat([window_PWH[slot][torch.arange(lo, p0, device=dev) % W].to(kv_qH.dtype), kv_qH])
        keep = torch.arange(max(p0, p1 - W), p1, device=dev)
        window_PWH[slot, keep % W] = kv_qH[keep - p0].to(window_PWH.dtype)
        q_pos = torch.arange(p0, p1, device=dev)
        k_pos = torch.arange(lo, p1, device=dev)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - W)
        if cfg.compress_rate:
            table_M = ctx.attn.block_tables_SM[s].long()
            if self.compressor is not None:
                self._compress(h_qD, p0, p1, slot, table_M, state, pages[0])
            entries_EH = self._entries(pages[1][0], p1, table_M)
            if self.indexer is not None:
                self._index(q_pos, h_qD, q_res_qQ, p1, key, table_M, pages[1][1])
            picks = self.scratch.get(("picks", key))
            if entries_EH.shape[0]:
                seen = picks if picks is not None else torch.zeros(len(q_pos), entries_EH.shape[0], dtype=torch.bool,
                                                                    device=dev)
                keys = torch.cat([keys, entries_EH.to(keys.dtype)])
                allowed = torch.cat([allowed, seen], dim=1)
        return self._attend(q_qNH, keys, allowed)

    def _attend(self, q_qNH: torch.Tensor, keys_KH: torch.Tensor, allowed_qK: torch.Tensor) -> torch.Tensor:
        """softmax over [the allowed keys' logits, the head's sink]; K = V."""
        logits = torch.einsum("qnh,kh->nqk", q_qNH, keys_KH) * self.cfg.softmax_scale
        logits = logits.masked_fill(~allowed_qK[None], float("-inf"))
        sinks = self.sinks_N.float().view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        full = torch.cat([logits, sinks.to(torch.promote_types(logits.dtype, torch.float32))], dim=-1)
        full = full - full.amax(-1, keepdim=True)
        probs = torch.softmax(full, dim=-1, dtype=full.dtype)[..., :-1].to(keys_KH.dtype)
        return torch.einsum("nqk,kh->qnh", probs, keys_KH)

    # -- the compressed entries ------------------------------------------------------------------------------------
    def _at(self, table_M: torch.Tensor, entries: torch.Tensor, block_rows: int):
        """(blocks, rows) of entries `entries` in the pages (block_rows entries per block)."""
        return table_M[entries // block_rows], entries % block_rows

    def _compress(self, h_qD, p0: int, p1: int, slot: torch.Tensor, table_M, state, paged) -> None:
        """The entries (and index keys) of the groups completing in [p0, p1), written into this source's pages."""
        comp, m, dev = self.compressor, self.cfg.compress_rate, h_qD.device
        assert comp is not None
        first, last = p0 // m, p1 // m  # groups [first, last) complete in [p0, p1): group g at (g + 1) m - 1
        if m == 1:
            latent_EH = comp.norm(F.linear(h_qD, comp.wkv))
        else:
            ring_PmC = state[1]
            H = self.cfg.head_dim
            rows = torch.cat([F.linear(h_qD.float(), comp.wkv.float()), F.linear(h_qD.float(), comp.wgate.float())], -1)
            if self._steps is not None:
                self._steps["ring"].append(rows)
            base = (p0 // m) * m
            old = ring_PmC[slot][torch.arange(base, p0, device=dev) % m].float()
            allrows = torch.cat([old, rows])  # positions base..p1-1
            keep = torch.arange(max(p0, (p1 // m) * m), p1, device=dev)
            ring_PmC[slot, keep % m] = rows[keep - p0].to(ring_PmC.dtype)
            n = last - first
            if n <= 0:
                return
            grouped = allrows[(first * m - base):(first * m - base) + n * m].view(n, m, 2 * H)
            kv, gate = grouped[..., :H], grouped[..., H:]
            latent_EH = comp.norm((kv * gate.softmax(dim=1, dtype=torch.float32)).sum(dim=1).to(h_qD.dtype))
        if last <= first:
            return
        if m == 1:
            latent_EH = latent_EH[first - p0:]
        pos = torch.arange(first, last, device=dev) * m
        entries_EH = fp4_block(self.compress_rope.rotate(latent_EH, pos), 16, e4m3_scales=True)
        rows_per_block = paged[0].shape[1]
        blocks, rows = self._at(table_M, torch.arange(first, last, device=dev), rows_per_block)
        paged[0][blocks, rows] = entries_EH.to(paged[0].dtype)
        ix = self.indexer
        if ix is not None and ix.owns_keys:
            k_EI = fp4_block(self.compress_rope.rotate(ix.k_norm(F.linear(latent_EH, ix.wk)), pos), 32)
            paged[1][blocks, rows] = k_EI.to(paged[1].dtype)

    def _entries(self, pages: torch.Tensor, p1: int, table_M) -> torch.Tensor:
        """The group's entries (or index keys: `pages`, its KV source's) complete by position p1 - 1: [p1 // m,
        width]."""
        m = self.cfg.compress_rate
        blocks, rows = self._at(table_M, torch.arange(p1 // m, device=table_M.device), pages.shape[1])
        return pages[blocks, rows]

    def _index(self, q_pos, h_qD, q_res_qQ, p1: int, key: tuple, table_M, key_pages) -> None:
        """This index source's picks (and, at the candidate source, the candidate blocks) for the sequence."""
        cfg, ix = self.cfg, self.indexer
        assert ix is not None
        keys_EI = self._entries(key_pages, p1, table_M)
        E = keys_EI.shape[0]
        if E == 0:
            self.scratch[("picks", key)] = None
            return
        nI, I, q = cfg.index_n_heads, cfg.index_head_dim, len(q_pos)
        iq = self.compress_rope.rotate(F.linear(q_res_qQ, ix.wq_b).view(q, nI, I), q_pos)
        iq = fp4_block(iq, 32)
        scores = torch.einsum("qnd,ed->qne", iq.float(), keys_EI.float()).relu() * I**-0.5
        weights = F.linear(h_qD, ix.weights_proj).float() * nI**-0.5
        scores_qE = (scores * weights[..., None]).sum(dim=1)
        visible_q = (q_pos + 1) // cfg.compress_rate
        scores_qE = scores_qE.masked_fill(torch.arange(E, device=q_pos.device)[None, :] >= visible_q[:, None],
                                          float("-inf"))
        if cfg.candidates == "publish":
            self.scratch[("candidates", key)] = candidate_blocks(scores_qE, visible_q, cfg.candidate_topk_blocks,
                                                                  cfg.candidate_block_size)
        elif cfg.candidates == "use":
            cand = self.scratch.get(("candidates", key))
            if cand is not None:
                scores_qE = scores_qE.masked_fill(~cand[:, :E], float("-inf"))
        top = scores_qE.topk(min(cfg.index_topk, E), dim=-1, sorted=False)
        picks = torch.zeros(q, E + 1, dtype=torch.bool, device=q_pos.device)
        picks.scatter_(1, torch.where(top.values > float("-inf"), top.indices, E), True)
        self.scratch[("picks", key)] = picks[:, :E]

    def weight_plan(self, p: str) -> WeightPlan:
        """transformers' names under `p` = "model.layers.{i}.attn."."""
        whole = () if self.tp is None else None
        plan = {p + "wq_a.weight": PlanEntry(self.wq_a, ()), p + "wkv.weight": PlanEntry(self.wkv, ()),
                p + "wq_b.weight": PlanEntry(self.wq_b, (), whole if whole is not None else self.heads),
                p + "wo_a.weight": PlanEntry(self.wo_a, (), whole if whole is not None else self.groups),
                p + "wo_b.weight": PlanEntry(self.wo_b, (), whole if whole is not None else (slice(None),) + self.groups),
                p + "q_norm.weight": PlanEntry(self.q_norm.weight, ()),
                p + "kv_norm.weight": PlanEntry(self.kv_norm.weight, ()),
                p + "attn_sink": PlanEntry(self.sinks_N, (), whole if whole is not None else self.sink_heads)}
        if self.compressor is not None:
            plan.update(self.compressor.weight_plan(p + "compressor."))
        if self.indexer is not None:
            plan.update(self.indexer.weight_plan(p + "indexer."))
        return plan


__all__ = ["Norm", "V41Attention", "candidate_blocks", "rms_norm"]
