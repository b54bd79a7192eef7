"""Hashed n-gram embedding tables, a reusable block (engine/models/ngram_embedding_config.py has the definition: Qwen3.8-Flash-
Next's PLE, the table shape DeepSeek-V4.1's Engram uses), and `causal_rows`, the per-sequence window of earlier rows
that such blocks (and short convolutions over a flat batch) read from a state pool.

Per-sequence state: the last context_len token ids, in a state pool [P, context_len] int64 held XOR eos_token_id, so
that a zeroed slot (a fresh sequence: engine/state/cache.py zeroes, the varlen path masks with has_initial) reads as
eos everywhere, the history transformers starts from.

Legend: T tokens in the flat batch, S sequences, P state slots, R window rows, C channels, E embed_dim, H heads.
"""
from __future__ import annotations

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .ngram_embedding_config import NGramEmbeddingConfig
from ..tp.group import TensorParallel
from .layers import ForwardContext


def _seq_of_tokens(qsl_S1: torch.Tensor, T: int) -> torch.Tensor:
    """int64 [T]: each token's sequence (no host sync)."""
    return torch.searchsorted(qsl_S1[1:].long(), torch.arange(T, device=qsl_S1.device), right=True)


def causal_rows(x_TC: torch.Tensor, pool_PRC: torch.Tensor, ctx: ForwardContext,
                pending: list | None = None) -> torch.Tensor:
    """Each token's R earlier rows, oldest first, [T, R, C]: from this step's rows of its sequence, before them from
    the sequence's state (pool_PRC[slot], R rows oldest first; zeros where the sequence starts here), and writes each
    sequence's last R rows (state then this step's) back to its slot.

    A verify step (speculative decoding: ctx.state.split): the verifying sequences read their states but leave them
    as they are, and what `replay_rows` needs is appended to `pending` (the caller's); the others run as above."""
    st = ctx.state
    split = st.split
    if split is None:
        return _rows(x_TC, pool_PRC, st.query_start_loc_S1, st.slots_S, st.has_initial_S, write=True)
    if pending is None:
        raise ValueError("causal_rows of a verify step needs `pending`, the states to replay after sampling.")
    v, r = split.verify, split.rest
    out_TRC = x_TC.new_empty(x_TC.shape[0], pool_PRC.shape[1], *x_TC.shape[1:])
    x_VC = x_TC.index_select(0, v.rows_T)
    out_TRC.index_copy_(0, v.rows_T, _rows(x_VC, pool_PRC, v.query_start_loc_S1, v.slots_S, v.has_initial_S,
                                           write=False))
    pending.append((x_VC, pool_PRC, v.query_start_loc_S1, v.slots_S))
    if r is not None:
        out_TRC.index_copy_(0, r.rows_T, _rows(x_TC.index_select(0, r.rows_T), pool_PRC, r.query_start_loc_S1,
                                               r.slots_S, r.has_initial_S, write=True))
    return out_TRC


def replay_rows(pending: list, num_accepted_S: torch.Tensor) -> None:
    """After a verify step's sampling: each verifying sequence's state takes its accepted tokens only (the last R
    rows of [state | its first num_accepted rows of the step])."""
    for x_VC, pool_PRC, qsl_S1, slots_S in pending:
        qsl = qsl_S1.long()
        slots, real = _real_slots(slots_S.long(), pool_PRC)
        state_SRC = pool_PRC.index_select(0, slots)
        _write_state(x_VC, pool_PRC, qsl[:-1], num_accepted_S.long().clamp(max=qsl[1:] - qsl[:-1]), slots, real,
                     state_SRC)
    pending.clear()


def _real_slots(slots_S: torch.Tensor, pool_PRC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A negative slot (a padded row: a decode graph's, the profiling step's) reads zeros and writes zeros into the
    null slot, the last, which stays zero (engine/state/cache.py)."""
    real_S = slots_S >= 0
    return torch.where(real_S, slots_S, pool_PRC.shape[0] - 1), real_S


def _rows(x_TC: torch.Tensor, pool_PRC: torch.Tensor, qsl_S1: torch.Tensor, slots_S: torch.Tensor,
          has_initial_S: torch.Tensor, write: bool) -> torch.Tensor:
    T, R = x_TC.shape[0], pool_PRC.shape[1]
    qsl_S1 = qsl_S1.long()
    slots_S, real_S = _real_slots(slots_S.long(), pool_PRC)
    has_S = has_initial_S & real_S
    seq_T = _seq_of_tokens(qsl_S1, T)
    i_T = torch.arange(T, device=x_TC.device) - qsl_S1.index_select(0, seq_T)
    state_SRC = pool_PRC.index_select(0, slots_S) * has_S.view(-1, 1, 1).to(pool_PRC.dtype)
    lag_R = torch.arange(R, 0, -1, device=x_TC.device)  # oldest first: lags R .. 1
    in_step_TR = i_T[:, None] >= lag_R[None, :]
    src_TR = (torch.arange(T, device=x_TC.device)[:, None] - lag_R[None, :]).clamp(min=0)
    state_row_TR = (R - (lag_R[None, :] - i_T[:, None])).clamp(0, R - 1)
    from_step = x_TC.index_select(0, src_TR.reshape(-1)).view(T, R, -1)
    from_state = state_SRC.index_select(0, seq_T)[torch.arange(T, device=x_TC.device)[:, None], state_row_TR]
    rows_TRC = torch.where(in_step_TR[..., None], from_step, from_state.to(x_TC.dtype))
    if write:
        _write_state(x_TC, pool_PRC, qsl_S1[:-1], qsl_S1[1:] - qsl_S1[:-1], slots_S, real_S, state_SRC)
    return rows_TRC


def _write_state(x_TC: torch.Tensor, pool_PRC: torch.Tensor, start_S: torch.Tensor, L_S: torch.Tensor,
                 slots_S: torch.Tensor, real_S: torch.Tensor, state_SRC: torch.Tensor) -> None:
    """Each sequence's new state: the last R rows of [state (R) | its L rows of x from start]."""
    T, R, S = x_TC.shape[0], pool_PRC.shape[1], slots_S.shape[0]
    c_SR = L_S[:, None] + torch.arange(R, device=x_TC.device)[None, :]
    in_new = c_SR >= R
    step_src = (start_S[:, None] + c_SR - R).clamp(0, max(T - 1, 0))
    new_from_step = x_TC.index_select(0, step_src.reshape(-1)).view(S, R, -1).to(pool_PRC.dtype)
    new_from_state = state_SRC[torch.arange(S, device=x_TC.device)[:, None], c_SR.clamp(max=R - 1)]
    new_SRC = torch.where(in_new[..., None], new_from_step, new_from_state)
    pool_PRC.index_copy_(0, slots_S, torch.where(real_S[:, None, None], new_SRC, torch.zeros_like(new_SRC)))


class NGramEmbedding(nn.Module):
    """One hashed n-gram table (engine/models/ngram_embedding_config.py): `forward(ids_T, ctx_pool_PK, ctx)` -> [T, E].

    Under tensor parallelism (`tp`) each rank holds its 1/size of every row's columns (transformers'
    "embedding_colwise" plan: the published tables are ~90 GiB), looks its columns up and the rows are all-gathered
    once (the ids, and so the rows looked up, are the same on every rank); whole on every rank when the head's width
    does not split."""

    def __init__(self, cfg: NGramEmbeddingConfig, dtype, device=None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp if tp is not None and tp.size > 1 and cfg.head_dim % tp.size == 0 else None
        self.c0, self.cols = (self.tp.shard(cfg.head_dim)[0], cfg.head_dim // self.tp.size) if self.tp else (
            0, cfg.head_dim)
        table_device = torch.device("cpu") if cfg.placement == "host" else device
        self.table_VH = nn.Parameter(torch.zeros(cfg.rows, self.cols, dtype=dtype, device=table_device),
                                     requires_grad=False)
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("multipliers_N", torch.tensor(cfg.multipliers(), **long), persistent=False)
        self.register_buffer("vocab_H", torch.tensor(cfg.head_vocab_sizes, **long), persistent=False)
        self.register_buffer("offsets_H", torch.tensor(cfg.head_offsets, **long), persistent=False)

    def history(self, ids_T: torch.Tensor, pool_PK: torch.Tensor, ctx: ForwardContext,
                pending: list | None = None) -> torch.Tensor:
        """int64 [T, ngram_size]: h_0 = the token, h_s = the one s back, eos past the sequence's start or at / after
        its last eos before the token (the definition's shifts)."""
        eos = self.cfg.eos_token_id
        ids_T = ids_T.long()
        earlier_TK = causal_rows((ids_T ^ eos)[:, None], pool_PK.unsqueeze(-1), ctx, pending)[..., 0] ^ eos
        hist = [ids_T]
        seen_eos = torch.zeros_like(ids_T, dtype=torch.bool)
        for s in range(1, self.cfg.ngram_size):
            h = earlier_TK[:, -s]
            seen_eos = seen_eos | (h == eos)
            hist.append(torch.where(seen_eos, torch.full_like(h, eos), h))
        return torch.stack(hist, dim=1)

    def forward(self, ids_T: torch.Tensor, pool_PK: torch.Tensor, ctx: ForwardContext,
                pending: list | None = None) -> torch.Tensor:
        """`pending`: a verify step's states to replay (causal_rows)."""
        c = self.cfg
        hist_TN = self.history(ids_T, pool_PK, ctx, pending)
        products_TN = hist_TN * self.multipliers_N  # int64, wrapping as transformers' does
        rows = []
        mixed = products_TN[:, 0]
        for n in range(2, c.ngram_size + 1):
            mixed = torch.bitwise_xor(mixed, products_TN[:, n - 1])
            h0 = (n - 2) * c.heads_per_ngram
            vocab, offsets = self.vocab_H[h0:h0 + c.heads_per_ngram], self.offsets_H[h0:h0 + c.heads_per_ngram]
            rows.append(torch.remainder(mixed[:, None], vocab[None, :]) + offsets[None, :])
        rows_TH = torch.cat(rows, dim=1)
        table = self.table_VH
        out = table.index_select(0, rows_TH.reshape(-1).to(table.device))  # "host": gathered in host memory
        out = out.to(ids_T.device)
        if self.tp is not None:  # this rank's columns of each row -> every column, in rank order
            out = self.tp.all_gather_last(out)
        return out.view(ids_T.shape[0], c.embed_dim)

    def weight_plan(self, name: str, parts: int = 1, buffers: str | None = None,
                    names: frozenset[str] = frozenset()) -> WeightPlan:
        """The table under `name`, or `parts` shards `name.shard_{j}.weight` cut as torch.chunk cuts rows (what
        transformers' save_pretrained writes for split_ngram_parts). `buffers`: the prefix of the hashing constants
        a checkpoint may hold beside the table (transformers saves them: layer_multipliers, ngram_heads_offsets,
        ngram_heads_vocab_sizes); those `names` holds are read over the ones computed from the config, as
        transformers reads them."""
        plan: WeightPlan = {}
        if buffers is not None:
            for ckpt, buf in (("layer_multipliers", self.multipliers_N), ("ngram_heads_offsets", self.offsets_H),
                              ("ngram_heads_vocab_sizes", self.vocab_H)):
                if buffers + ckpt in names:
                    plan[buffers + ckpt] = PlanEntry(buf, ())
        cols = (slice(None), slice(self.c0, self.c0 + self.cols)) if self.tp is not None else ()
        if parts == 1:
            return {**plan, name + ".weight": PlanEntry(self.table_VH, (), cols)}
        rows = self.cfg.rows
        size = -(-rows // parts)
        for j, r0 in enumerate(range(0, rows, size)):
            plan[f"{name}.shard_{j}.weight"] = PlanEntry(self.table_VH, (slice(r0, min(rows, r0 + size)),), cols)
        return plan


__all__ = ["NGramEmbedding", "causal_rows", "replay_rows"]
