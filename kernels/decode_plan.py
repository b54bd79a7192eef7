"""Which cached context each decode row of a step reads, and how the plain-torch paged attention gathers it
(kernels/attention.py runs the attention over what is gathered here).

Legend: S sequences, C context positions, K kv heads, H head dim, L block size, M blocks per sequence.

A step's decode rows (one query token each) are read in groups: a small all-decode batch as one group in its own
order, else groups of `DECODE_GROUP` sequences of similar length (padding each group to its longest context wastes
little). A group's keys and values are gathered by flat slots (positions past a sequence's end at the null block)
or, on a CPU, by whole cache blocks (a block's tokens are one contiguous row: 15x less copying on a cold cache),
the positions past a sequence's end in its last block then zeroed. Stale or NaN cache contents are never read
either way. The plans are the step's: its first layer builds them, the others reuse them (kernels/step_memo.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cpu_reads import cpu_nonzero
from .step_memo import STEP_MEMO

if TYPE_CHECKING:
    from .attention import AttentionMetadata

DECODE_GROUP = 32


def step_partition(meta: "AttentionMetadata") -> tuple[list[int], list[int], list[int]]:
    """(starts: each sequence's first row in the flat batch, then the total; decode_seqs: the sequences of one
    query token; chunk_seqs: the others), the step's for every layer."""
    def make():
        starts = list(itertools.accumulate(meta.query_lens, initial=0))
        decode = [s for s, n in enumerate(meta.query_lens) if n == 1]
        chunks = [s for s, n in enumerate(meta.query_lens) if n != 1] if len(decode) < len(meta.query_lens) else []
        return starts, decode, chunks
    return STEP_MEMO.get("partition", (meta.query_start_loc_S1,), (len(meta.query_lens), meta.max_query_len), make)


@dataclass
class GroupPlan:
    """A group of decode sequences and where its context is (module docstring). `tok_idx_S` None: the group is
    the whole batch in its own order (row s of q is sequence s). Gathered by `slots_SC`, or by `blocks_X` with the
    flat positions `stale_Y` of the gathered [S * C] zeroed."""

    tok_idx_S: torch.Tensor | None
    valid_SC: torch.Tensor
    slots_SC: torch.Tensor | None = None
    blocks_X: torch.Tensor | None = None
    stale_Y: torch.Tensor | None = None

    @property
    def mask_S11C(self) -> torch.Tensor:
        return self.valid_SC[:, None, None, :]

    def gather(self, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's keys and values [S, C, K, H] / [S, C, K, Hv] as the caches store them (the caller widens
        an fp8 cache's)."""
        S, C = self.valid_SC.shape
        out = []
        for cache_BLKH in (k_cache_BLKH, v_cache_BLKH):
            if self.slots_SC is not None:
                x_SCKH = cache_BLKH.view(-1, *cache_BLKH.shape[2:]).index_select(0, self.slots_SC.reshape(-1))
            else:
                x_SCKH = cache_BLKH.index_select(0, self.blocks_X)
                if self.stale_Y is not None:  # a zero byte is 0.0 in every cache dtype, fp8 included
                    x_SCKH.view(torch.uint8).view(S * C, -1).index_fill_(0, self.stale_Y, 0)
            out.append(x_SCKH.view(S, C, *cache_BLKH.shape[2:]))
        return out[0], out[1]


def decode_plans(meta: "AttentionMetadata", seqs: list[int], starts: list[int], block_size: int,
                 window: int | None, device: torch.device) -> list[GroupPlan]:
    """The step's decode groups of `seqs`, a sliding window's bound in their masks: built by the step's first
    layer, reused by the others."""
    return STEP_MEMO.get(
        "decode_groups", (meta.seq_lens_S, meta.block_tables_SM, meta.query_start_loc_S1),
        (block_size, meta.null_block, window, meta.max_seq_len, len(seqs)),
        lambda: _plans(meta, seqs, starts, block_size, window, device))


def _plans(meta, seqs, starts, block_size: int, window: int | None, device) -> list[GroupPlan]:
    in_order = len(seqs) == len(meta.query_lens) <= DECODE_GROUP  # the whole batch, one group in its order
    if not in_order:
        seqs = sorted(seqs, key=lambda s: meta.seq_lens[s])
    if device.type == "cpu":
        return _block_plans(meta, None if in_order else seqs, starts, block_size, window, device)
    if in_order:
        return [_windowed(meta, _whole_batch_slots(meta, block_size, device), None, window, device)]
    plans = []
    for i in range(0, len(seqs), DECODE_GROUP):
        group = seqs[i: i + DECODE_GROUP]
        tok_idx_S, slots_SC, valid_SC = decode_group_slots(meta, group, starts, block_size, device)
        plans.append(_windowed(meta, GroupPlan(tok_idx_S, valid_SC, slots_SC=slots_SC), group, window, device))
    return plans


def _windowed(meta, plan: GroupPlan, group: list[int] | None, window: int | None, device) -> GroupPlan:
    """The decode query sits at seq_len - 1: with a window it sees keys > seq_len - 1 - window."""
    if window is not None:
        lens_S = meta.seq_lens_S if group is None else meta.seq_lens_S.index_select(0, torch.tensor(group, device=device))
        C = plan.valid_SC.shape[1]
        plan.valid_SC = plan.valid_SC & (torch.arange(C, device=device)[None, :] >= lens_S.long()[:, None] - window)
    return plan


def _whole_batch_slots(meta, block_size: int, device) -> GroupPlan:
    """The whole batch in order, gathered by slots: each sequence's flat cache slots up to the longest context
    (past its end: the null block), and which are inside it."""
    pos_C = torch.arange(meta.max_seq_len, device=device)
    valid_SC = pos_C[None, :] < meta.seq_lens_S[:, None]
    blocks_SC = meta.block_tables_SM.index_select(1, pos_C // block_size).long()
    slots_SC = torch.where(valid_SC, blocks_SC * block_size + pos_C % block_size, meta.null_block * block_size)
    return GroupPlan(None, valid_SC, slots_SC=slots_SC)


def _block_plans(meta, seqs: list[int] | None, starts, block_size: int, window: int | None, device
                 ) -> list[GroupPlan]:
    """A CPU's groups gathered by whole blocks, `seqs` sorted by length (None: the whole batch in its order, one
    group). The tables, lengths, masks and stale positions are derived over the batch at once (a dozen ops), each
    group a slice of them (three ops more). Reading values on the host waits for nothing on a CPU: the stale
    positions are found with nonzero (kernels/cpu_reads.py). The host lengths bound the widths only (they may be
    upper bounds: AttentionMetadata)."""
    M_max = meta.block_tables_SM.shape[1]
    if seqs is None:
        tok_idx_S, lens_S, tables_SM = None, meta.seq_lens_S.long(), meta.block_tables_SM
        groups, widths = [(0, len(meta.seq_lens))], [min(-(-meta.max_seq_len // block_size), M_max)]
    else:
        seq_idx_S = torch.tensor(seqs, device=device, dtype=torch.long)
        tok_idx_S = torch.tensor([starts[s] for s in seqs], device=device, dtype=torch.long)
        lens_S = meta.seq_lens_S.index_select(0, seq_idx_S).long()
        tables_SM = meta.block_tables_SM.index_select(0, seq_idx_S)
        groups = [(i, min(i + DECODE_GROUP, len(seqs))) for i in range(0, len(seqs), DECODE_GROUP)]
        widths = [min(-(-meta.seq_lens[seqs[r1 - 1]] // block_size), M_max) for _, r1 in groups]
    M = max(widths)
    blocks_S1 = (lens_S[:, None] + block_size - 1) // block_size
    blocks_SM = torch.where(torch.arange(M, device=device)[None, :] < blocks_S1, tables_SM[:, :M].long(),
                            meta.null_block)
    pos_C = torch.arange(M * block_size, device=device)
    valid_SC = pos_C[None, :] < lens_S[:, None]
    stale_SC = (pos_C[None, :] < blocks_S1 * block_size) & ~valid_SC
    if window is not None:  # the decode query sits at seq_len - 1: it sees keys > seq_len - 1 - window
        valid_SC = valid_SC & (pos_C[None, :] >= lens_S[:, None] - window)
    plans = []
    for (r0, r1), m in zip(groups, widths):
        C = m * block_size
        stale_Y = cpu_nonzero(stale_SC[r0:r1, :C].reshape(-1))
        plans.append(GroupPlan(None if tok_idx_S is None else tok_idx_S[r0:r1], valid_SC[r0:r1, :C],
                               blocks_X=blocks_SM[r0:r1, :m].reshape(-1), stale_Y=stale_Y if stale_Y.numel() else None))
    return plans


def decode_group_slots(meta: "AttentionMetadata", seqs: list[int], starts: list[int], block_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a group of decode sequences sorted by length (reference paths of GQA and MLA attention):
    (tok_idx_S: each sequence's query row, slots_SC: the flat cache slot of every context position up to the
    longest, valid_SC: which positions are inside their sequence). Positions past a sequence's end point at the
    null block, which is all zeros, so stale or NaN data is never read. The lengths are the device's
    (`seq_lens_S`); the host's bound the gathered width only (they may be upper bounds: AttentionMetadata)."""
    max_ctx = meta.seq_lens[seqs[-1]]
    seq_idx_S = torch.tensor(seqs, device=device, dtype=torch.long)
    tok_idx_S = torch.tensor([starts[s] for s in seqs], device=device, dtype=torch.long)
    lens_S = meta.seq_lens_S.index_select(0, seq_idx_S).long()
    pos_C = torch.arange(max_ctx, device=device)
    tables_SM = meta.block_tables_SM.index_select(0, seq_idx_S).long()
    blocks_SC = tables_SM.index_select(1, pos_C // block_size)
    valid_SC = pos_C[None, :] < lens_S[:, None]
    slots_SC = torch.where(valid_SC, blocks_SC * block_size + pos_C % block_size, meta.null_block * block_size)
    return tok_idx_S, slots_SC, valid_SC


__all__ = ["DECODE_GROUP", "GroupPlan", "decode_group_slots", "decode_plans", "step_partition"]
